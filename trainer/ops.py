"""The two hot spots of training, each behind one function and one switch.

``backend="torch"`` is the pure-PyTorch path (CPU, ONNX export, reference);
``backend="triton"`` calls the fused kernels in :mod:`kernels`.  Callers pass the
backend explicitly; :func:`default_backend` picks triton on CUDA and torch elsewhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BACKENDS = ("torch", "triton")


def default_backend(device: torch.device | str) -> str:
    return "triton" if torch.device(device).type == "cuda" else "torch"


def resolve_backend(kernels: str, device: torch.device | str | None = None) -> str:
    """The kernel backend for a ``model.kernels`` setting: the one place ``auto`` is decided
    (:func:`default_backend` of ``device``: Triton on CUDA, else PyTorch; no device yet: PyTorch,
    the network being built on the CPU before it moves)."""
    if kernels != "auto":
        return check_backend(kernels)
    return default_backend(device) if device is not None else "torch"


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; valid: {', '.join(BACKENDS)}")
    return backend


def cosine_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """cos(theta) between each row of ``x`` (B x D) and each class weight (C x D): B x C."""
    return F.linear(F.normalize(x, dim=1), F.normalize(weight, dim=1))


def margin_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    s: float,
    m1: float,
    m2: float,
    m3: float,
    label_smoothing: float = 0.0,
    backend: str = "torch",
) -> torch.Tensor:
    """Mean combined-margin softmax cross-entropy over normalised features and weights.

    Target logit ``s * (cos(m1*theta + m2) - m3)``, others ``s * cos(theta)``; see
    :func:`kernels.margin_ce.margin_cross_entropy_reference` for the exact math.
    """
    if check_backend(backend) == "triton":
        from facefuse.kernels.margin_ce import margin_cross_entropy as fused
    else:
        from facefuse.kernels.margin_ce import margin_cross_entropy_reference as fused
    return fused(x, weight, labels, s=s, m1=m1, m2=m2, m3=m3, label_smoothing=label_smoothing)


def depthwise_conv7x7(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, backend: str = "torch"
) -> torch.Tensor:
    """Depthwise 7x7 convolution, stride 1, padding 3: ``x`` is N x C x H x W, weight C x 1 x 7 x 7."""
    if check_backend(backend) == "triton":
        from facefuse.kernels.dwconv import depthwise_conv7x7 as fused

        return fused(x, weight, bias)
    return F.conv2d(x, weight, bias, padding=3, groups=x.shape[1])
