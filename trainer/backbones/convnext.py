"""ConvNeXt (Liu et al. 2022) trunk, from scratch, with the depthwise 7x7 conv behind trainer.ops.

Stem: 4x4 stride-4 conv + channel LayerNorm (28 px at 112 px input). Between stages: channel
LayerNorm + 2x2 stride-2 conv, so the stages run at 28, 14, 7 and 3 px. A final channel LayerNorm
(the one the classification head would apply) closes the trunk, so features leave normalised.

Block (x is N x C x H x W)::

    y = dwconv7x7(x)                           # trainer.ops.depthwise_conv7x7, selectable backend
    y = Linear(4C -> C)(GELU(Linear(C -> 4C)(LayerNorm(y))))   # per pixel, channels last
    x = x + drop_path(gamma * y)               # gamma: layer scale, init 1e-6
"""

from __future__ import annotations

import torch
import torch.nn as nn

from facefuse.trainer import ops

from .registry import BACKBONES
from .layers import DropPath, LayerNorm2d, check_options, drop_path_rates, make_divisible

LAYER_SCALE_INIT = 1e-6


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int, drop_path: float = 0.0, kernel_backend: str = "torch"):
        super().__init__()
        self.kernel_backend = ops.check_backend(kernel_backend)
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)  # parameter holder only
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), LAYER_SCALE_INIT))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        if self.kernel_backend == "triton":
            x = x.contiguous(memory_format=torch.channels_last)
        x = ops.depthwise_conv7x7(x, self.dwconv.weight, self.dwconv.bias, backend=self.kernel_backend)
        x = x.permute(0, 2, 3, 1)  # N H W C: LayerNorm and Linear act on the last dim
        x = self.pwconv2(self.act(self.pwconv1(self.norm(x))))
        x = (self.gamma * x).permute(0, 3, 1, 2)
        return shortcut + self.drop_path(x)


class ConvNeXt(nn.Module):
    def __init__(
        self,
        depths: tuple[int, ...],
        dims: tuple[int, ...],
        *,
        width: float = 1.0,
        drop_path: float = 0.0,
        kernel_backend: str = "torch",
    ):
        super().__init__()
        check_options(width, drop_path)
        self.kernel_backend = ops.check_backend(kernel_backend)
        dims = [make_divisible(d * width) for d in dims]
        self.stem = nn.Sequential(nn.Conv2d(3, dims[0], 4, stride=4), LayerNorm2d(dims[0], eps=1e-6))
        rates = iter(drop_path_rates(drop_path, sum(depths)))
        stages = []
        for i, (depth, dim) in enumerate(zip(depths, dims)):
            down = nn.Identity() if i == 0 else downsample(dims[i - 1], dim)
            blocks = [ConvNeXtBlock(dim, next(rates), kernel_backend) for _ in range(depth)]
            stages.append(nn.Sequential(down, *blocks))
        self.stages = nn.Sequential(*stages)
        self.norm = LayerNorm2d(dims[-1], eps=1e-6)
        self.num_features = dims[-1]
        self.reduction = 4 * 2 ** (len(depths) - 1)
        self.apply(_init_weights)

    def set_kernel_backend(self, backend: str) -> None:
        """Route every block's depthwise conv through ``backend`` ("torch" or "triton")."""
        self.kernel_backend = ops.check_backend(backend)
        for m in self.modules():
            if isinstance(m, ConvNeXtBlock):
                m.kernel_backend = backend

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.stages(self.stem(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)


def downsample(c_in: int, c_out: int) -> nn.Sequential:
    """Channel LayerNorm + 2x2 stride-2 conv between stages."""
    return nn.Sequential(LayerNorm2d(c_in, eps=1e-6), nn.Conv2d(c_in, c_out, 2, stride=2))


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, (nn.Conv2d, nn.Linear)):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


@BACKBONES.register("convnext_t")
def convnext_t(**kwargs) -> ConvNeXt:
    return ConvNeXt((3, 3, 9, 3), (96, 192, 384, 768), **kwargs)


@BACKBONES.register("convnext_nano")
def convnext_nano(**kwargs) -> ConvNeXt:
    return ConvNeXt((2, 2, 8, 2), (80, 160, 320, 640), **kwargs)


@BACKBONES.register("convnext_pico")
def convnext_pico(**kwargs) -> ConvNeXt:
    return ConvNeXt((2, 2, 6, 2), (64, 128, 256, 512), **kwargs)


@BACKBONES.register("convnext_atto")
def convnext_atto(**kwargs) -> ConvNeXt:
    return ConvNeXt((2, 2, 6, 2), (40, 80, 160, 320), **kwargs)
