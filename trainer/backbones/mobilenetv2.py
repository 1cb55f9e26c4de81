"""MobileNetV2 (Sandler et al. 2018) trunk with total stride 16 for 112 px faces.

The standard settings table, except that the 160-channel group keeps stride 1 (the last stride-2
group in the table), so 112 px input gives a 7 x 7 map. The 1x1 conv to ``last_channels`` (default
``1280 * max(1, width)``, rounded to a multiple of 8) closes the trunk.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from facefuse.trainer.ops import check_backend

from .registry import BACKBONES
from .layers import DropPath, check_options, drop_path_rates, make_divisible

# expansion t, channels c, repeats n, stride s of the first block (the paper's Table 2)
SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 1),  # stride 2 in the paper: dropped for total stride 16
    (6, 320, 1, 1),
)


def conv_bn_relu6(c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    """1x1 expand (ReLU6) -> 3x3 depthwise (ReLU6) -> 1x1 linear bottleneck; residual when shapes match."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand: int, drop_path: float = 0.0):
        super().__init__()
        hidden = c_in * expand
        layers = [conv_bn_relu6(c_in, hidden, 1)] if expand != 1 else []
        layers += [
            conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
        ]
        self.branch = nn.Sequential(*layers)
        self.has_skip = stride == 1 and c_in == c_out
        self.drop_path = DropPath(drop_path) if self.has_skip else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.has_skip:
            return x + self.drop_path(self.branch(x))
        return self.branch(x)


class MobileNetV2(nn.Module):
    def __init__(
        self,
        *,
        width: float = 1.0,
        drop_path: float = 0.0,
        kernel_backend: str = "torch",
        last_channels: int | None = None,
    ):
        super().__init__()
        check_options(width, drop_path)
        if last_channels is not None and last_channels <= 0:
            raise ValueError(f"last_channels must be > 0, got {last_channels}")
        self.kernel_backend = check_backend(kernel_backend)  # no custom kernels here
        c_in = make_divisible(32 * width)
        self.stem = conv_bn_relu6(3, c_in, 3, stride=2)
        rates = iter(drop_path_rates(drop_path, sum(n for _, _, n, _ in SETTINGS)))
        stages = []
        for t, c, n, s in SETTINGS:
            c_out = make_divisible(c * width)
            blocks = []
            for j in range(n):
                blocks.append(InvertedResidual(c_in, c_out, s if j == 0 else 1, t, next(rates)))
                c_in = c_out
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        if last_channels is None:
            last_channels = make_divisible(1280 * max(1.0, width))
        self.conv_last = conv_bn_relu6(c_in, last_channels, 1)
        self.num_features = last_channels
        self.reduction = 2 * 2 ** sum(s == 2 for *_, s in SETTINGS)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def set_kernel_backend(self, backend: str) -> None:
        """Uniform interface with ConvNeXt; MobileNetV2 has no custom kernels, so only validates."""
        self.kernel_backend = check_backend(backend)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_last(self.stages(self.stem(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)


@BACKBONES.register("mobilenetv2")
def mobilenetv2(**kwargs) -> MobileNetV2:
    return MobileNetV2(**kwargs)
