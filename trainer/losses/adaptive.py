r"""Two margin heads beyond the combined margin: AdaFace and sub-centre ArcFace.

**AdaFace** (Kim, Jain, Liu, CVPR 2022): the margin adapts to image quality, with the embedding's
norm as its proxy. Per batch, with ``n_i = clip(||x_i||, 1e-3, 100)`` (no gradient) and running
statistics ``mu, sigma`` of the norms (exponential moving average, momentum ``t_alpha``; updated
in training mode only, from the batch mean and unbiased std)::

    q_i       = clip(h (n_i - mu) / (sigma + 1e-3), -1, 1)      quality, in [-1, 1]
    g_angle_i = -m q_i,     g_add_i = m q_i + m
    cos_ij    = clip(xh_i . wh_j, -1 + 1e-3, 1 - 1e-3)          (every class, as the paper's code)
    z_iy      = s (cos(clip(arccos(cos_iy) + g_angle_i, 1e-3, pi - 1e-3)) - g_add_i)
    z_ij      = s cos_ij  (j != y);   loss = cross-entropy(z, y)

A high-quality face (q = 1) gets ``cos(theta - m) - 2m``, a low-quality one (q = -1) ArcFace's
``cos(theta + m)``, q = 0 CosFace's ``cos(theta) - m``: the paper's reading is that the margin
emphasises hard samples when the image is good and easy ones when it is poor. Defaults are the
paper's: m = 0.4, h = 0.333, s = 64, t_alpha = 0.01, mu = 20 and sigma = 100 at start.

**Sub-centre ArcFace** (Deng et al., ECCV 2020): K centres per class; a class's cosine is the best
of its K centres, so noisy or atypical images of an identity can gather around a non-dominant
sub-centre instead of pulling the dominant one::

    cos_ij = max_k xh_i . wh_jk,   z_iy = s phi(cos_iy) (ArcFace margin, kernels.margin),  z_ij = s cos_ij

K = 3 by default (the paper's). The paper's optional second stage (dropping non-dominant
sub-centres and the samples far from the dominant one) is not implemented.

Fused kernel: neither head runs it (``kernel_backend`` is accepted, both values run this torch
code). AdaFace's target logit is per-row arithmetic on the target cosine, which the kernel's design
allows (it takes the target logit and its slope per row from the host), but the host-side terms are
written for the combined margin only; sub-centre's max over K centres is not a column of the
softmax, so it does not fit the kernel's one-column-per-class tiles.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from facefuse.kernels.margin import target_logit
from facefuse.trainer.losses.margin import HEADS, HeadOutput, _check_batch, _check_common, _compute_dtype
from facefuse.trainer.ops import check_backend, cosine_logits

ADAFACE_EPS = 1e-3


class _CentresHead(nn.Module):
    """Shared parts: centres ``rows x D`` initialised N(0, 0.01), scale, label smoothing, backend.
    ``options``: what :func:`~trainer.losses.margin.build_head` passes (the heads' other arguments,
    AdaFace's ``h`` / ``t_alpha`` and the sub-centre count, keep the papers' defaults there)."""

    options: ClassVar[frozenset[str]] = frozenset({"s", "margin", "label_smoothing", "kernel_backend"})
    default_margin: ClassVar[float]

    def __init__(self, embedding_dim: int, num_classes: int, rows: int, *, s: float, margin: float | None,
                 label_smoothing: float, kernel_backend: str, device=None, dtype=None):
        super().__init__()
        _check_common(s, label_smoothing)
        self.margin = self.default_margin if margin is None else float(margin)
        if not 0.0 <= self.margin < 1.0:
            raise ValueError(f"margin must be in [0, 1) for {type(self).__name__}, got {self.margin}")
        self.embedding_dim, self.num_classes = embedding_dim, num_classes
        self.s, self.label_smoothing = float(s), label_smoothing
        self.kernel_backend = check_backend(kernel_backend)
        self.weight = nn.Parameter(torch.empty(rows, embedding_dim, device=device, dtype=dtype))
        nn.init.normal_(self.weight, mean=0.0, std=0.01)

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)


@HEADS.register("adaface")
class AdaFace(_CentresHead):
    """AdaFace: a margin set per image by its feature norm (module docstring)."""

    default_margin = 0.4
    extra_options: ClassVar[frozenset[str]] = frozenset({"h", "t_alpha"})

    def __init__(self, embedding_dim: int, num_classes: int, *, s: float = 64.0, margin: float | None = None,
                 h: float = 0.333, t_alpha: float = 0.01, label_smoothing: float = 0.0,
                 kernel_backend: str = "torch", device=None, dtype=None):
        super().__init__(embedding_dim, num_classes, num_classes, s=s, margin=margin,
                         label_smoothing=label_smoothing, kernel_backend=kernel_backend, device=device, dtype=dtype)
        if not h > 0:
            raise ValueError(f"h must be > 0, got {h}")
        if not 0 < t_alpha <= 1:
            raise ValueError(f"t_alpha must be in (0, 1], got {t_alpha}")
        self.h, self.t_alpha = float(h), float(t_alpha)
        self.register_buffer("norm_mean", torch.tensor(20.0, device=device))
        self.register_buffer("norm_std", torch.tensor(100.0, device=device))

    def quality(self, emb: torch.Tensor) -> torch.Tensor:
        """q_i in [-1, 1] from the (detached) feature norms; updates the running statistics first
        when training."""
        norms = torch.linalg.vector_norm(emb.detach().to(_compute_dtype(emb.dtype)), dim=1).clamp(ADAFACE_EPS, 100.0)
        if self.training:
            with torch.no_grad():
                std = norms.std() if norms.numel() > 1 else torch.zeros_like(self.norm_std)
                self.norm_mean.mul_(1 - self.t_alpha).add_(self.t_alpha * norms.mean())
                self.norm_std.mul_(1 - self.t_alpha).add_(self.t_alpha * std)
        return (self.h * (norms - self.norm_mean) / (self.norm_std + ADAFACE_EPS)).clamp(-1.0, 1.0)

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> HeadOutput:
        _check_batch(emb, labels, self.embedding_dim)
        q = self.quality(emb)
        cos = cosine_logits(emb, self.weight)
        cos = cos.to(_compute_dtype(cos.dtype)).clamp(-1 + ADAFACE_EPS, 1 - ADAFACE_EPS)
        theta = torch.acos(cos.gather(1, labels[:, None]).squeeze(1))
        g_angle, g_add = -self.margin * q, self.margin * q + self.margin
        phi = torch.cos((theta + g_angle.to(theta.dtype)).clamp(ADAFACE_EPS, math.pi - ADAFACE_EPS)) - g_add
        logits = self.s * cos.scatter(1, labels[:, None], phi[:, None].to(cos.dtype))
        return HeadOutput(self._loss(logits, labels), cos.detach().argmax(dim=1))

    def extra_repr(self) -> str:
        return (f"{self.embedding_dim} -> {self.num_classes}, s={self.s}, m={self.margin}, h={self.h}, "
                f"t_alpha={self.t_alpha}, label_smoothing={self.label_smoothing}")


@HEADS.register("subcenter_arcface")
class SubCenterArcFace(_CentresHead):
    """Sub-centre ArcFace: K centres per class, a class scores its best one (module docstring).
    ``weight`` is ``C*K x D``, class j's centres in rows ``j*K .. j*K + K - 1``."""

    default_margin = 0.5
    extra_options: ClassVar[frozenset[str]] = frozenset({"subcenters"})

    def __init__(self, embedding_dim: int, num_classes: int, *, s: float = 64.0, margin: float | None = None,
                 subcenters: int = 3, label_smoothing: float = 0.0, kernel_backend: str = "torch",
                 device=None, dtype=None):
        if int(subcenters) != subcenters or subcenters < 1:
            raise ValueError(f"subcenters must be an integer >= 1, got {subcenters}")
        super().__init__(embedding_dim, num_classes, num_classes * int(subcenters), s=s, margin=margin,
                         label_smoothing=label_smoothing, kernel_backend=kernel_backend, device=device, dtype=dtype)
        self.subcenters = int(subcenters)

    def class_cosines(self, emb: torch.Tensor) -> torch.Tensor:
        """B x C: each class's best sub-centre cosine."""
        cos = cosine_logits(emb, self.weight)
        return cos.view(emb.shape[0], self.num_classes, self.subcenters).amax(dim=2)

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> HeadOutput:
        _check_batch(emb, labels, self.embedding_dim)
        cos = self.class_cosines(emb)
        cos = cos.to(_compute_dtype(cos.dtype))
        phi = target_logit(cos.gather(1, labels[:, None]), 1.0, self.margin, 0.0)
        logits = self.s * cos.scatter(1, labels[:, None], phi)
        return HeadOutput(self._loss(logits, labels), cos.detach().argmax(dim=1))

    def extra_repr(self) -> str:
        return (f"{self.embedding_dim} -> {self.num_classes} x {self.subcenters} sub-centres, s={self.s}, "
                f"m={self.margin}, label_smoothing={self.label_smoothing}")
