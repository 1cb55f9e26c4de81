"""Classification heads: plain softmax, and one margin head whose margins are data.

:class:`MarginHead` is a normalised linear layer (:func:`trainer.ops.cosine_logits`), the combined
margin applied to the target logit only, and a scaled softmax cross-entropy, kept as separate
pieces.  The margin is ``(m1, m2, m3, easy_margin)``; its formula, continuation past theta*,
derivative, easy_margin rule and named settings are written once, in :mod:`kernels.margin`
(:func:`~kernels.margin.target_logit`), which the fused kernel and its reference call as well.
Gradients are exact: they flow through ``arccos`` (no straight-through trick, no ``no_grad``).

ArcFace, CosFace, SphereFace and NormFace are registrations of the named settings of
:data:`kernels.margin.MARGINS` (one ``margin`` each); ``combined`` takes ``m1, m2, m3`` directly.

``kernel_backend="triton"`` replaces the whole forward by one call of the fused kernel
:func:`kernels.margin_ce.margin_cross_entropy`, which computes the same formula.
"""

from __future__ import annotations

import math
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from facefuse.core.registry import Registry
from facefuse.kernels.margin import MARGINS, check_margins, target_logit
from facefuse.trainer.ops import check_backend, cosine_logits

HEADS: Registry[type[nn.Module]] = Registry("classification head")


class HeadOutput(NamedTuple):
    loss: torch.Tensor  # scalar, mean over the batch
    preds: torch.Tensor  # B int64: argmax of the logits without margin


def _check_common(s: float | None, label_smoothing: float) -> None:
    if s is not None and not (math.isfinite(s) and s > 0):
        raise ValueError(f"s must be a finite number > 0, got {s}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")


def _check_batch(emb: torch.Tensor, labels: torch.Tensor, embedding_dim: int) -> None:
    if emb.dim() != 2 or emb.shape[1] != embedding_dim:
        raise ValueError(f"embeddings must be B x {embedding_dim}, got {tuple(emb.shape)}")
    if labels.shape != emb.shape[:1] or labels.dtype != torch.int64:
        raise ValueError(f"labels must be int64 of shape ({emb.shape[0]},), got {labels.dtype} {tuple(labels.shape)}")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The margin math runs in float32 at least (float64 stays float64), also under autocast."""
    return torch.promote_types(dtype, torch.float32)


@HEADS.register("softmax")
class SoftmaxHead(nn.Module):
    """Linear layer with bias and softmax cross-entropy.  There is no fused kernel for it:
    ``kernel_backend`` is accepted for a uniform interface and both values run the same code."""

    # the options of :func:`trainer.losses.build_head` this head takes (``s`` and ``margin`` it ignores)
    options: ClassVar[frozenset[str]] = frozenset({"label_smoothing", "kernel_backend"})

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
    """Normalised linear layer + combined margin ``(m1, m2, m3, easy_margin)`` on the target logit +
    scaled softmax cross-entropy.  ``m1, m2, m3`` must lie in :data:`kernels.margin.COMBINED_RANGES`."""

    options: ClassVar[frozenset[str]] = frozenset(
        {"s", "m1", "m2", "m3", "easy_margin", "label_smoothing", "kernel_backend"})

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        *,
        m1: float = 1.0,
        m2: float = 0.0,
        m3: float = 0.0,
        easy_margin: bool = False,
        s: float = 64.0,
        label_smoothing: float = 0.0,
        kernel_backend: str = "torch",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.m1, self.m2, self.m3 = check_margins(m1, m2, m3)
        _check_common(s, label_smoothing)
        self.easy_margin = bool(easy_margin)
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
        return (self.m1, self.m2, self.m3)

    def target_logit(self, cos_target: torch.Tensor) -> torch.Tensor:
        """``phi`` (before scaling) of :mod:`kernels.margin` for the target cosines."""
        return target_logit(cos_target, self.m1, self.m2, self.m3, self.easy_margin)

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
            return self._fused_forward(emb, labels)
        logits, cos = self.logits(emb, labels)
        loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        return HeadOutput(loss, cos.detach().argmax(dim=1))

    def _fused_forward(self, emb: torch.Tensor, labels: torch.Tensor) -> HeadOutput:
        from facefuse.kernels.margin_ce import margin_cross_entropy

        # under autocast the embeddings are bf16/fp16 and the master weights fp32: the kernel reads
        # the fp32 weights as they are and casts its tiles to the embeddings' dtype on load (no C x D
        # copy of the weights kept alive until backward); accumulation is fp32
        weight = self.weight if self.weight.dtype in (emb.dtype, torch.float32) else self.weight.to(emb.dtype)
        loss, _, preds = margin_cross_entropy(
            emb, weight, labels, s=self.s, m1=self.m1, m2=self.m2, m3=self.m3,
            easy_margin=self.easy_margin, label_smoothing=self.label_smoothing, return_preds=True,
        )
        return HeadOutput(loss, preds)

    def extra_repr(self) -> str:
        return (f"{self.embedding_dim} -> {self.num_classes}, s={self.s}, margins={self.margins}, "
                f"easy_margin={self.easy_margin}, label_smoothing={self.label_smoothing}, "
                f"kernel_backend={self.kernel_backend!r}")


class NamedMarginHead(MarginHead):
    """A :class:`MarginHead` at the named setting :attr:`setting` of :data:`kernels.margin.MARGINS`,
    set by one ``margin`` (None: the setting's default).  Subclasses only name the setting."""

    setting: ClassVar[str]
    options: ClassVar[frozenset[str]] = frozenset(
        {"s", "margin", "easy_margin", "label_smoothing", "kernel_backend"})

    def __init__(self, embedding_dim: int, num_classes: int, *, margin: float | None = None, **kwargs):
        named = MARGINS[self.setting]
        m1, m2, m3 = named.margins(margin)
        super().__init__(embedding_dim, num_classes, m1=m1, m2=m2, m3=m3, **kwargs)
        self.margin = named.default if margin is None else float(margin)


@HEADS.register("normface")
class NormFace(NamedMarginHead):
    """Normalised softmax, ``phi = cos``: takes no margin."""

    setting = "normface"
    options = NamedMarginHead.options - {"margin"}  # build_head ignores margin for it


@HEADS.register("arcface")
class ArcFace(NamedMarginHead):
    """Additive angular margin ``cos(theta + m)``: ``(1, m, 0)``."""

    setting = "arcface"


@HEADS.register("cosface")
class CosFace(NamedMarginHead):
    """Additive cosine margin ``cos(theta) - m``: ``(1, 0, m)``."""

    setting = "cosface"


@HEADS.register("sphereface")
class SphereFace(NamedMarginHead):
    """Multiplicative angular margin ``cos(m * theta)``: ``(m, 0, 0)``."""

    setting = "sphereface"


@HEADS.register("combined")
class CombinedMargin(MarginHead):
    """insightface's combined margin ``cos(m1*theta + m2) - m3`` with ``m1, m2, m3`` set directly."""


_NEUTRAL_MARGINS = {"m1": 1.0, "m2": 0.0, "m3": 0.0}


def build_head(
    name: str,
    embedding_dim: int,
    num_classes: int,
    *,
    s: float = 64.0,
    margin: float | None = None,
    m1: float = 1.0,
    m2: float = 0.0,
    m3: float = 0.0,
    easy_margin: bool = False,
    label_smoothing: float = 0.0,
    kernel_backend: str = "torch",
    **head_options,
) -> nn.Module:
    """The classification head ``name`` of :data:`HEADS`.

    ``margin=None`` keeps the head's own default (arcface 0.5, cosface 0.35, sphereface 1.35);
    softmax and normface ignore ``margin`` (softmax also ``s``).  ``m1, m2, m3`` are for
    ``"combined"`` only: non-neutral values with another head, ``margin`` with ``"combined"``, or
    ``easy_margin`` with ``"softmax"`` raise ``ValueError`` rather than being silently dropped.
    Each head class lists the options it takes in ``options``; ``head_options`` are a head's own
    settings (AdaFace's ``h``, ``t_alpha``; sub-centre ArcFace's ``subcenters``), listed in its
    ``extra_options``; any other key raises ``ValueError`` naming the valid ones.
    """
    cls = HEADS.get(name)
    valid = sorted(head_settings(name))
    for key in head_options:
        if key not in valid:
            raise ValueError(f"{key}: not a setting of the {name!r} head; valid: {', '.join(valid) or 'none'}")
    if margin is not None and {"m1", "m2", "m3"} <= cls.options:
        raise ValueError(f"margin: the {name!r} head takes m1, m2, m3, not margin")
    given_margins = {"m1": m1, "m2": m2, "m3": m3}
    stray = [k for k, v in given_margins.items() if k not in cls.options and v != _NEUTRAL_MARGINS[k]]
    if stray:
        raise ValueError(f"{', '.join(stray)}: only the 'combined' head takes m1, m2, m3; use margin= for {name!r}")
    if easy_margin and "easy_margin" not in cls.options:
        raise ValueError(f"easy_margin: the {name!r} head has no margin")
    given = dict(given_margins, s=s, margin=margin, easy_margin=easy_margin, label_smoothing=label_smoothing,
                 kernel_backend=kernel_backend)
    return cls(embedding_dim, num_classes, **{k: v for k, v in given.items() if k in cls.options and v is not None},
               **head_options)


def head_settings(name: str) -> frozenset[str]:
    """The head ``name``'s own settings beyond the shared ones (``loss.head_options``)."""
    return getattr(HEADS.get(name), "extra_options", frozenset())
