"""Classification heads: plain softmax and the additive/multiplicative angular margins.

Every margin head is a normalised linear layer (:func:`trainer.ops.cosine_logits`), a margin
applied to the target logit only, and a softmax cross-entropy, kept as separate pieces.  The
variants differ only in :meth:`MarginHead.target_logit`.

The combined margin (insightface's ``m1, m2, m3``), with ``c = clamp(cos, -1+1e-7, 1-1e-7)``,
``theta = arccos(c)`` and ``theta* = (pi - m2) / m1``::

    phi(theta) = cos(m1*theta + m2) - m3                  if theta <= theta*
               = cos(theta) - cos(theta*) - 1 - m3         otherwise

Past ``theta*`` the angle ``m1*theta + m2`` would pass ``pi`` and ``cos`` would rise again
(the "theta + m > pi" case); the second branch keeps ``phi`` continuous (both sides equal
``-1 - m3`` at ``theta*``) and strictly decreasing on ``(0, pi)``.  Gradients are exact: they
flow through ``arccos`` (``d theta / d c = -1 / sqrt(1 - c^2)``, finite thanks to the clamp),
with no straight-through trick and no ``no_grad`` around the margin.  ArcFace is ``(1, m, 0)``,
CosFace ``(1, 0, m)``, SphereFace ``(m, 0, 0)``, NormFace ``(1, 0, 0)``.  Logits are
``s * cos`` for the other classes and ``s * phi`` for the target.

``kernel_backend="triton"`` replaces the whole forward by one call of the fused kernel
:func:`kernels.margin_ce.margin_cross_entropy`, which computes the same formula.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from facefuse.trainer.ops import check_backend, cosine_logits

COS_EPS = 1e-7


class HeadOutput(NamedTuple):
    loss: torch.Tensor  # scalar, mean over the batch
    preds: torch.Tensor  # B int64: argmax of the logits without margin


def _require(ok: bool, param: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{param} {message}")


def _check_common(s: float | None, label_smoothing: float) -> None:
    if s is not None:
        _require(math.isfinite(s) and s > 0, "s", f"must be a finite number > 0, got {s}")
    _require(0.0 <= label_smoothing < 1.0, "label_smoothing", f"must be in [0, 1), got {label_smoothing}")


def _check_batch(emb: torch.Tensor, labels: torch.Tensor, embedding_dim: int) -> None:
    if emb.dim() != 2 or emb.shape[1] != embedding_dim:
        raise ValueError(f"embeddings must be B x {embedding_dim}, got {tuple(emb.shape)}")
    if labels.shape != emb.shape[:1] or labels.dtype != torch.int64:
        raise ValueError(f"labels must be int64 of shape ({emb.shape[0]},), got {labels.dtype} {tuple(labels.shape)}")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The margin math runs in float32 at least (float64 stays float64), also under autocast."""
    return torch.promote_types(dtype, torch.float32)


def clamped_angle(cos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(c, theta)``: the cosine clamped inside (-1, 1) and its angle ``arccos(c)``."""
    c = cos.clamp(-1.0 + COS_EPS, 1.0 - COS_EPS)
    return c, torch.acos(c)


def combined_margin(cos: torch.Tensor, m1: float, m2: float, m3: float) -> torch.Tensor:
    """The combined-margin target logit ``phi`` (before scaling) of the module docstring."""
    c, theta = clamped_angle(cos)
    theta_star = (math.pi - m2) / m1
    inside = torch.cos(m1 * theta + m2) - m3
    beyond = c - math.cos(theta_star) - 1.0 - m3
    return torch.where(theta <= theta_star, inside, beyond)


class SoftmaxHead(nn.Module):
    """Linear layer with bias and softmax cross-entropy.  There is no fused kernel for it:
    ``kernel_backend`` is accepted for a uniform interface and both values run the same code."""

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        *,
        label_smoothing: float = 0.0,
        kernel_backend: str = "torch",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        _check_common(None, label_smoothing)
        self.embedding_dim, self.num_classes = embedding_dim, num_classes
        self.label_smoothing = label_smoothing
        self.kernel_backend = check_backend(kernel_backend)
        self.linear = nn.Linear(embedding_dim, num_classes, device=device, dtype=dtype)

    @property
    def weight(self) -> nn.Parameter:
        return self.linear.weight

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> HeadOutput:
        _check_batch(emb, labels, self.embedding_dim)
        logits = self.linear(emb)
        loss = F.cross_entropy(logits.to(_compute_dtype(logits.dtype)), labels, label_smoothing=self.label_smoothing)
        return HeadOutput(loss, logits.detach().argmax(dim=1))


class MarginHead(nn.Module):
    """Normalised linear layer + target-logit margin + scaled softmax cross-entropy.

    Subclasses set :attr:`margins` ``(m1, m2, m3)`` (used by the fused kernel) and override
    :meth:`target_logit`, which must equal :func:`combined_margin` with those margins.
    """

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        *,
        s: float = 64.0,
        label_smoothing: float = 0.0,
        kernel_backend: str = "torch",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        _check_common(s, label_smoothing)
        self.embedding_dim, self.num_classes = embedding_dim, num_classes
        self.s, self.label_smoothing = float(s), label_smoothing
        self.kernel_backend = kernel_backend
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_dim, device=device, dtype=dtype))
        nn.init.normal_(self.weight, mean=0.0, std=0.01)

    @property
    def kernel_backend(self) -> str:
        return self._kernel_backend

    @kernel_backend.setter
    def kernel_backend(self, backend: str) -> None:
        self._kernel_backend = check_backend(backend)

    @property
    def margins(self) -> tuple[float, float, float]:
        raise NotImplementedError

    def target_logit(self, cos_target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def logits(self, emb: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(s * logits with margin, cos without margin)``, both B x C in the compute dtype."""
        cos = cosine_logits(emb, self.weight)
        cos = cos.to(_compute_dtype(cos.dtype))
        index = labels.unsqueeze(1)
        phi = self.target_logit(cos.gather(1, index))
        return self.s * cos.scatter(1, index, phi), cos

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> HeadOutput:
        _check_batch(emb, labels, self.embedding_dim)
        if self.kernel_backend == "triton":
            from facefuse.kernels.margin_ce import margin_cross_entropy

            m1, m2, m3 = self.margins
            # under autocast the embeddings are bf16/fp16 and the master weights fp32: the kernel
            # reads both in the embeddings' dtype and accumulates in fp32
            loss, _, preds = margin_cross_entropy(
                emb, self.weight.to(emb.dtype), labels, s=self.s, m1=m1, m2=m2, m3=m3,
                label_smoothing=self.label_smoothing, return_preds=True,
            )
            return HeadOutput(loss, preds)
        logits, cos = self.logits(emb, labels)
        loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        return HeadOutput(loss, cos.detach().argmax(dim=1))

    def extra_repr(self) -> str:
        m1, m2, m3 = self.margins
        return (f"{self.embedding_dim} -> {self.num_classes}, s={self.s}, margins=({m1}, {m2}, {m3}), "
                f"label_smoothing={self.label_smoothing}, kernel_backend={self.kernel_backend!r}")


class NormFace(MarginHead):
    """Normalised softmax: no margin, ``phi = cos``."""

    @property
    def margins(self) -> tuple[float, float, float]:
        return (1.0, 0.0, 0.0)

    def target_logit(self, cos_target: torch.Tensor) -> torch.Tensor:
        return clamped_angle(cos_target)[0]


class ArcFace(MarginHead):
    """Additive angular margin: ``phi = cos(theta + m)`` up to ``theta* = pi - m``."""

    def __init__(self, embedding_dim: int, num_classes: int, *, margin: float = 0.5, **kwargs):
        _require(0.0 <= margin < math.pi, "margin", f"(ArcFace) must be in [0, pi), got {margin}")
        super().__init__(embedding_dim, num_classes, **kwargs)
        self.margin = float(margin)

    @property
    def margins(self) -> tuple[float, float, float]:
        return (1.0, self.margin, 0.0)

    def target_logit(self, cos_target: torch.Tensor) -> torch.Tensor:
        # Past theta* = pi - m: cos(theta) - cos(pi - m) - 1 = cos(theta) + cos(m) - 1.
        c, theta = clamped_angle(cos_target)
        beyond = c + math.cos(self.margin) - 1.0
        return torch.where(theta <= math.pi - self.margin, torch.cos(theta + self.margin), beyond)


class CosFace(MarginHead):
    """Additive cosine margin: ``phi = cos(theta) - m`` (never needs the second branch)."""

    def __init__(self, embedding_dim: int, num_classes: int, *, margin: float = 0.35, **kwargs):
        _require(0.0 <= margin < 1.0, "margin", f"(CosFace) must be in [0, 1), got {margin}")
        super().__init__(embedding_dim, num_classes, **kwargs)
        self.margin = float(margin)

    @property
    def margins(self) -> tuple[float, float, float]:
        return (1.0, 0.0, self.margin)

    def target_logit(self, cos_target: torch.Tensor) -> torch.Tensor:
        return clamped_angle(cos_target)[0] - self.margin


class SphereFace(MarginHead):
    """Multiplicative angular margin: ``phi = cos(m * theta)`` up to ``theta* = pi / m``."""

    def __init__(self, embedding_dim: int, num_classes: int, *, margin: float = 1.35, **kwargs):
        _require(math.isfinite(margin) and margin >= 1.0, "margin", f"(SphereFace m1) must be >= 1, got {margin}")
        super().__init__(embedding_dim, num_classes, **kwargs)
        self.margin = float(margin)

    @property
    def margins(self) -> tuple[float, float, float]:
        return (self.margin, 0.0, 0.0)

    def target_logit(self, cos_target: torch.Tensor) -> torch.Tensor:
        c, theta = clamped_angle(cos_target)
        theta_star = math.pi / self.margin
        beyond = c - math.cos(theta_star) - 1.0
        return torch.where(theta <= theta_star, torch.cos(self.margin * theta), beyond)


class CombinedMargin(MarginHead):
    """insightface's combined margin ``cos(m1*theta + m2) - m3``; covers the three above."""

    def __init__(
        self, embedding_dim: int, num_classes: int, *, m1: float = 1.0, m2: float = 0.0, m3: float = 0.0, **kwargs
    ):
        _require(math.isfinite(m1) and m1 >= 1.0, "m1", f"must be >= 1, got {m1}")
        _require(0.0 <= m2 < math.pi, "m2", f"must be in [0, pi), got {m2}")
        _require(0.0 <= m3 < 1.0, "m3", f"must be in [0, 1), got {m3}")
        super().__init__(embedding_dim, num_classes, **kwargs)
        self.m1, self.m2, self.m3 = float(m1), float(m2), float(m3)

    @property
    def margins(self) -> tuple[float, float, float]:
        return (self.m1, self.m2, self.m3)

    def target_logit(self, cos_target: torch.Tensor) -> torch.Tensor:
        return combined_margin(cos_target, self.m1, self.m2, self.m3)
