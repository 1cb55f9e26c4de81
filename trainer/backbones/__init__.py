"""From-scratch backbones: ``build_backbone(name, ...)`` maps B x 3 x S x S to B x num_features x h x w.

Every backbone has ``stem``, ``stages``, ``forward_features`` (== ``forward``), ``num_features``,
``reduction`` (total stride) and ``set_kernel_backend``. No pretrained weights are ever loaded.
"""

from __future__ import annotations

import torch.nn as nn

from .convnext import ConvNeXt, convnext_atto, convnext_nano, convnext_pico, convnext_t
from .layers import check_options
from .mobilenetv2 import MobileNetV2, mobilenetv2
from .registry import BACKBONES
from .resnet import ResNet, resnet18, resnet34, resnet50

def build_backbone(
    name: str, *, width: float = 1.0, drop_path: float = 0.0, kernel_backend: str = "torch", **options
) -> nn.Module:
    """Build backbone ``name``; ``options`` go to its constructor (e.g. ``last_channels`` for mobilenetv2)."""
    make = BACKBONES.get(name)
    check_options(width, drop_path)
    return make(width=width, drop_path=drop_path, kernel_backend=kernel_backend, **options)


__all__ = ["BACKBONES", "ConvNeXt", "MobileNetV2", "ResNet", "build_backbone"]
