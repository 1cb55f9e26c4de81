"""Pair-based losses: ``loss(emb, labels) -> scalar``.

Each loss normalises the embeddings, builds the explicit cosine similarity matrix
(:func:`cosine_similarity_matrix`), asks a miner (:mod:`trainer.losses.miners`) for index
tuples and gathers its terms from the matrix.  A batch with no usable tuple (for example all
labels distinct) gives ``emb.sum() * 0``: a zero that keeps the autograd graph.

Every loss is registered in :data:`PAIR_LOSSES` and declares its settings, with their defaults and
checks, in a frozen dataclass ``Settings`` nested in its class; :func:`build_pair_loss` takes them
as one mapping and :func:`pair_loss_settings` lists the defaults.  Adding a pair loss is one class
here (its ``Settings`` and its registration line).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from facefuse.core.registry import Registry, UnknownNameError
from facefuse.trainer.losses.miners import MINERS, all_pairs, npair_indices

PAIR_LOSSES: Registry[type["PairLoss"]] = Registry("pair loss")


def _require(ok: bool, param: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{param} {message}")


def _check_batch(emb: torch.Tensor, labels: torch.Tensor) -> None:
    if emb.dim() != 2:
        raise ValueError(f"embeddings must be B x D, got {tuple(emb.shape)}")
    if labels.shape != emb.shape[:1] or labels.dtype != torch.int64:
        raise ValueError(f"labels must be int64 of shape ({emb.shape[0]},), got {labels.dtype} {tuple(labels.shape)}")


def _normalized(emb: torch.Tensor) -> torch.Tensor:
    """Unit rows, computed in float32 at least (float64 stays float64)."""
    return F.normalize(emb.to(torch.promote_types(emb.dtype, torch.float32)), dim=1)


def cosine_similarity_matrix(emb: torch.Tensor) -> torch.Tensor:
    """B x B cosine similarities of the rows of ``emb``."""
    x = _normalized(emb)
    return x @ x.T


def _no_tuple(emb: torch.Tensor) -> torch.Tensor:
    return emb.sum() * 0


class PairLoss(nn.Module):
    """Base of the registered pair losses: ``loss(emb, labels) -> scalar``.

    Constructed as ``Loss(embedding_dim=..., num_classes=..., **settings)`` (the sizes are there for
    the losses that own parameters, such as the centre loss); ``settings`` must be fields of the
    subclass's frozen dataclass ``Settings`` and are kept, checked, in :attr:`settings`.
    """

    Settings: ClassVar[type]

    def __init__(self, *, embedding_dim: int, num_classes: int, **settings):
        super().__init__()
        self.embedding_dim, self.num_classes = embedding_dim, num_classes
        self.settings = self.Settings(**settings)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in asdict(self.settings).items())


def pair_loss_settings(name: str) -> dict:
    """The settings of the pair loss ``name`` and their defaults (for help texts and configs)."""
    return asdict(PAIR_LOSSES.get(name).Settings())


def build_pair_loss(name: str, embedding_dim: int, num_classes: int, **settings) -> PairLoss:
    """The pair loss ``name`` with ``settings`` (a subset of :func:`pair_loss_settings`; the rest
    keep their defaults).  A key that is not a setting of that loss raises ValueError naming the
    valid ones; an unknown ``name`` raises :class:`~core.registry.UnknownNameError`."""
    cls = PAIR_LOSSES.get(name)
    valid = [f.name for f in fields(cls.Settings)]
    for key in settings:
        if key not in valid:
            raise ValueError(f"{key}: not a setting of the {name!r} pair loss; valid: {', '.join(valid)}")
    return cls(embedding_dim=embedding_dim, num_classes=num_classes, **settings)


@PAIR_LOSSES.register("triplet")
class TripletLoss(PairLoss):
    """``mean relu(d(a,p) - d(a,n) + margin)`` over the mined triplets, ``d = 1 - cos``.

    ``mining`` is a name of :data:`~trainer.losses.miners.MINERS`: ``"batch_hard"`` (one triplet
    per anchor: farthest positive, nearest negative), ``"semi_hard"`` (see
    :func:`~trainer.losses.miners.semi_hard_triplets` for the rule and its fallback) or ``"all"``
    (every valid triplet; B x B x B memory).
    """

    @dataclass(frozen=True)
    class Settings:
        margin: float = 0.2
        mining: str = "batch_hard"

        def __post_init__(self):
            _require(math.isfinite(self.margin) and self.margin >= 0, "margin",
                     f"(triplet) must be >= 0, got {self.margin}")
            if self.mining not in MINERS:
                raise UnknownNameError(f"mining: {MINERS.unknown(self.mining)}")

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        _check_batch(emb, labels)
        margin = self.settings.margin
        dist = 1.0 - cosine_similarity_matrix(emb)
        a, p, n = MINERS.get(self.settings.mining)(dist.detach(), labels, margin)
        if a.numel() == 0:
            return _no_tuple(emb)
        return F.relu(dist[a, p] - dist[a, n] + margin).mean()


@PAIR_LOSSES.register("center")
class CenterLoss(PairLoss):
    """``0.5 * mean_i ||f_i - c_{y_i}||^2`` (Wen et al. 2016) on L2-normalised features.

    Features are normalised so that the loss lives on the same scale as the margin heads'
    cosine geometry and cannot be lowered by shrinking the embeddings.  The centres are an
    ``nn.Parameter`` trained by gradient (initialised as random unit vectors). ``lr=None`` trains
    them with the model's optimiser, lr and schedule (like a head's class weights); a number gives
    them that fixed lr in a param group of their own.  Under AdamW that number is a per-step move
    of each coordinate, not the paper's SGD-style alpha: 0.5 there throws unit-norm centres far
    off the sphere within a few steps (measured: loss ~100 instead of <= 2).
    """

    @dataclass(frozen=True)
    class Settings:
        lr: float | None = None

        def __post_init__(self):
            lr = self.lr
            _require(lr is None or (math.isfinite(lr) and lr > 0), "lr", f"(center loss) must be > 0, got {lr}")

    def __init__(
        self,
        *,
        embedding_dim: int,
        num_classes: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **settings,
    ):
        super().__init__(embedding_dim=embedding_dim, num_classes=num_classes, **settings)
        centers = torch.randn(num_classes, embedding_dim, device=device, dtype=dtype)
        self.centers = nn.Parameter(F.normalize(centers, dim=1))

    @property
    def lr(self) -> float | None:
        """The centres' own lr, or None (read by :func:`trainer.optim.param_groups`)."""
        return self.settings.lr

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        _check_batch(emb, labels)
        diff = _normalized(emb) - self.centers[labels]
        return 0.5 * diff.pow(2).sum(dim=1).mean()

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, embedding_dim={self.embedding_dim}, {super().extra_repr()}"


def _check_temperature(t: float) -> None:
    _require(math.isfinite(t) and t > 0, "temperature", f"must be > 0, got {t}")


@PAIR_LOSSES.register("npair")
class NPairLoss(PairLoss):
    """Multi-class N-pair loss (Sohn 2016) on cosine similarities divided by ``temperature``.

    One (anchor, positive) pair per class with two or more samples
    (:func:`~trainer.losses.miners.npair_indices`); each anchor's positive competes in a
    softmax against the other anchors' positives:
    ``mean_i -log softmax_j(cos(a_i, p_j) / T)[i]``, which equals Sohn's
    ``log(1 + sum_{j != i} exp(f_i.f_j+ - f_i.f_i+))`` at ``T = 1``.  On unit vectors those
    logits span only [-1, 1], hence the temperature.  Fewer than two pairs: zero.
    """

    @dataclass(frozen=True)
    class Settings:
        temperature: float = 0.1

        def __post_init__(self):
            _check_temperature(self.temperature)

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        _check_batch(emb, labels)
        anchor, positive = npair_indices(labels)
        if anchor.numel() < 2:
            return _no_tuple(emb)
        sim = cosine_similarity_matrix(emb)
        logits = sim[anchor][:, positive] / self.settings.temperature
        target = torch.arange(anchor.numel(), device=logits.device)
        return F.cross_entropy(logits, target)


@PAIR_LOSSES.register("circle")
class CircleLoss(PairLoss):
    """Circle loss (Sun et al. 2020), pair-based form over all pairs of the batch.

    Per anchor with positives ``s_p`` and negatives ``s_n`` (cosine similarities)::

        L = softplus(logsumexp(gamma * a_n * (s_n - m)) + logsumexp(-gamma * a_p * (s_p - 1 + m)))
        a_p = relu(1 + m - s_p),  a_n = relu(s_n + m)

    averaged over the anchors that have at least one positive and one negative.  The weights
    ``a_p, a_n`` are treated as constants in the backward pass (``detach_weights=True``), as
    the paper's gradient analysis and its reference code do; ``detach_weights=False`` gives
    the full derivative.
    """

    @dataclass(frozen=True)
    class Settings:
        m: float = 0.25
        gamma: float = 256.0
        detach_weights: bool = True

        def __post_init__(self):
            _require(0.0 <= self.m < 1.0, "m", f"(circle loss) must be in [0, 1), got {self.m}")
            _require(math.isfinite(self.gamma) and self.gamma > 0, "gamma",
                     f"(circle loss) must be > 0, got {self.gamma}")

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        _check_batch(emb, labels)
        st = self.settings
        return circle_loss_from_similarity(
            cosine_similarity_matrix(emb), labels, st.m, st.gamma, st.detach_weights, zero=_no_tuple(emb)
        )


def circle_loss_from_similarity(
    sim: torch.Tensor,
    labels: torch.Tensor,
    m: float,
    gamma: float,
    detach_weights: bool = True,
    *,
    zero: torch.Tensor | None = None,
) -> torch.Tensor:
    """:class:`CircleLoss` on a given B x B similarity matrix (row ``i`` = anchor ``i``)."""
    a1, p, a2, n = all_pairs(labels)
    valid = torch.zeros(sim.shape[0], dtype=torch.bool, device=sim.device)
    valid[a1] = True
    has_neg = torch.zeros_like(valid)
    has_neg[a2] = True
    valid &= has_neg
    if not bool(valid.any()):
        return sim.sum() * 0 if zero is None else zero
    s_p, s_n = sim[a1, p], sim[a2, n]
    alpha_p, alpha_n = F.relu(1.0 + m - s_p), F.relu(s_n + m)
    if detach_weights:
        alpha_p, alpha_n = alpha_p.detach(), alpha_n.detach()
    empty = sim.new_full(sim.shape, float("-inf"))
    logit_p = empty.index_put((a1, p), -gamma * alpha_p * (s_p - (1.0 - m)))
    logit_n = empty.index_put((a2, n), gamma * alpha_n * (s_n - m))
    per_anchor = torch.logsumexp(logit_p[valid], dim=1) + torch.logsumexp(logit_n[valid], dim=1)
    return F.softplus(per_anchor).mean()


@PAIR_LOSSES.register("supcon")
class SupConLoss(PairLoss):
    """Supervised contrastive loss (Khosla et al. 2020, the ``L_out`` form).

    ``L_i = -1/|P(i)| sum_{p in P(i)} log(exp(s_ip / T) / sum_{a != i} exp(s_ia / T))``,
    averaged over the anchors with at least one positive; the others are excluded.
    """

    @dataclass(frozen=True)
    class Settings:
        temperature: float = 0.1

        def __post_init__(self):
            _check_temperature(self.temperature)

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        _check_batch(emb, labels)
        a1, p, _, _ = all_pairs(labels)
        if a1.numel() == 0:
            return _no_tuple(emb)
        sim = cosine_similarity_matrix(emb)
        eye = torch.eye(sim.shape[0], dtype=torch.bool, device=sim.device)
        log_prob = F.log_softmax((sim / self.settings.temperature).masked_fill(eye, float("-inf")), dim=1)
        batch = sim.shape[0]
        total = log_prob.new_zeros(batch).index_add(0, a1, log_prob[a1, p])
        count = torch.bincount(a1, minlength=batch)
        has_pos = count > 0
        return -(total[has_pos] / count[has_pos]).mean()
