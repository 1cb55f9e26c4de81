"""Small pieces shared by the backbones: stochastic depth, channel LayerNorm, rounding, init."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round ``value`` to the nearest multiple of ``divisor``, never below ``min_value`` (default
    ``divisor``) and never more than 10% below ``value`` (the MobileNet rule)."""
    min_value = divisor if min_value is None else min_value
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero whole samples of ``x`` with probability ``p`` and scale the kept
    ones by ``1 / (1 - p)`` so the expectation is unchanged. Identity when not training or p == 0."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask_shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = torch.empty(mask_shape, dtype=x.dtype, device=x.device).bernoulli_(keep)
    return x * mask / keep


class DropPath(nn.Module):
    """Module form of :func:`drop_path` (applied to a residual branch before the addition)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {p}")
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p:g}"


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel dimension of an N x C x H x W tensor (any memory format)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


def check_options(width: float, drop_path: float) -> None:
    """The option checks every backbone constructor shares."""
    if not width > 0:
        raise ValueError(f"width must be > 0, got {width}")
    if not 0.0 <= drop_path < 1.0:
        raise ValueError(f"drop_path must be in [0, 1), got {drop_path}")


def drop_path_rates(drop_path: float, num_blocks: int) -> list[float]:
    """Per-block stochastic-depth rates rising linearly from 0 to ``drop_path`` over the blocks."""
    if num_blocks == 1:
        return [float(drop_path)]
    return [drop_path * i / (num_blocks - 1) for i in range(num_blocks)]
