"""ResNet-18/34/50 adapted to 112 px face crops.

The ImageNet stem (7x7 stride-2 conv + max-pool, stride 4) is replaced by a 3x3 stride-2 conv +
BN + ReLU, so at 112 px the four stages run at 56, 28, 14 and 7 px (total stride 16). The last
BatchNorm of every residual branch starts with gamma = 0, so each block is the identity at init.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from facefuse.trainer.ops import check_backend

from .registry import BACKBONES
from .layers import DropPath, check_options, drop_path_rates, make_divisible

STAGE_WIDTHS = (64, 128, 256, 512)


def conv_bn(c_in: int, c_out: int, kernel: int, stride: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(c_out),
    ]


class BasicBlock(nn.Module):
    """Two 3x3 convs; ``out_channels = planes``."""

    expansion = 1

    def __init__(self, c_in: int, planes: int, stride: int = 1, drop_path: float = 0.0):
        super().__init__()
        c_out = planes * self.expansion
        self.branch = nn.Sequential(
            *conv_bn(c_in, planes, 3, stride), nn.ReLU(inplace=True), *conv_bn(planes, c_out, 3)
        )
        self.shortcut = shortcut(c_in, c_out, stride)
        self.drop_path = DropPath(drop_path)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.shortcut(x) + self.drop_path(self.branch(x)))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carries the stride), 1x1 expand by 4; ``out_channels = 4 * planes``."""

    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int = 1, drop_path: float = 0.0):
        super().__init__()
        c_out = planes * self.expansion
        self.branch = nn.Sequential(
            *conv_bn(c_in, planes, 1), nn.ReLU(inplace=True),
            *conv_bn(planes, planes, 3, stride), nn.ReLU(inplace=True),
            *conv_bn(planes, c_out, 1),
        )  # fmt: skip
        self.shortcut = shortcut(c_in, c_out, stride)
        self.drop_path = DropPath(drop_path)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.shortcut(x) + self.drop_path(self.branch(x)))


def shortcut(c_in: int, c_out: int, stride: int) -> nn.Module:
    """Identity, or 1x1 conv + BN where the shape changes."""
    if stride == 1 and c_in == c_out:
        return nn.Identity()
    return nn.Sequential(*conv_bn(c_in, c_out, 1, stride))


class ResNet(nn.Module):
    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        depths: tuple[int, ...],
        *,
        width: float = 1.0,
        drop_path: float = 0.0,
        kernel_backend: str = "torch",
    ):
        super().__init__()
        check_options(width, drop_path)
        self.kernel_backend = check_backend(kernel_backend)  # no custom kernels here
        widths = [make_divisible(w * width) for w in STAGE_WIDTHS]
        self.stem = nn.Sequential(*conv_bn(3, widths[0], 3, stride=2), nn.ReLU(inplace=True))
        rates = iter(drop_path_rates(drop_path, sum(depths)))
        stages, c_in = [], widths[0]
        for i, (depth, planes) in enumerate(zip(depths, widths)):
            blocks = []
            for j in range(depth):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(block(c_in, planes, stride, next(rates)))
                c_in = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.num_features = c_in
        self.reduction = 2 ** len(depths)  # stem stride 2, then three stride-2 stages
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, (BasicBlock, Bottleneck)):
                nn.init.zeros_(m.branch[-1].weight)  # the branch's last BN: block == identity at init

    def set_kernel_backend(self, backend: str) -> None:
        """Uniform interface with ConvNeXt; ResNet has no custom kernels, so only validates."""
        self.kernel_backend = check_backend(backend)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)


@BACKBONES.register("resnet18")
def resnet18(**kwargs) -> ResNet:
    return ResNet(BasicBlock, (2, 2, 2, 2), **kwargs)


@BACKBONES.register("resnet34")
def resnet34(**kwargs) -> ResNet:
    return ResNet(BasicBlock, (3, 4, 6, 3), **kwargs)


@BACKBONES.register("resnet50")
def resnet50(**kwargs) -> ResNet:
    return ResNet(Bottleneck, (3, 4, 6, 3), **kwargs)
