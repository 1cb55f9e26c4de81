"""Pair-based losses: ``loss(emb, labels) -> scalar``.

Each loss normalises the embeddings, builds the explicit cosine similarity matrix
(:func:`cosine_similarity_matrix`), asks a miner (:mod:`trainer.losses.miners`) for index
tuples and gathers its terms from the matrix.  A batch with no usable tuple (for example all
labels distinct) gives ``emb.sum() * 0``: a zero that keeps the autograd graph.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from facefuse.trainer.losses.miners import TRIPLET_MINERS, all_pairs, npair_indices


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


class TripletLoss(nn.Module):
    """``mean relu(d(a,p) - d(a,n) + margin)`` over the mined triplets, ``d = 1 - cos``.

    ``mining``: ``"batch_hard"`` (one triplet per anchor: farthest positive, nearest negative),
    ``"semi_hard"`` (see :func:`~trainer.losses.miners.semi_hard_triplets` for the rule and its
    fallback) or ``"all"`` (every valid triplet; B x B x B memory).
    """

    def __init__(self, margin: float = 0.2, mining: str = "batch_hard"):
        super().__init__()
        _require(math.isfinite(margin) and margin >= 0, "margin", f"(triplet) must be >= 0, got {margin}")
        if mining not in TRIPLET_MINERS:
            raise ValueError(f"mining: unknown {mining!r}; valid: {', '.join(TRIPLET_MINERS)}")
        self.margin, self.mining = float(margin), mining

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        _check_batch(emb, labels)
        dist = 1.0 - cosine_similarity_matrix(emb)
        a, p, n = TRIPLET_MINERS[self.mining](dist.detach(), labels, self.margin)
        if a.numel() == 0:
            return _no_tuple(emb)
        return F.relu(dist[a, p] - dist[a, n] + self.margin).mean()

    def extra_repr(self) -> str:
        return f"margin={self.margin}, mining={self.mining!r}"


class CenterLoss(nn.Module):
    """``0.5 * mean_i ||f_i - c_{y_i}||^2`` (Wen et al. 2016) on L2-normalised features.

    Features are normalised so that the loss lives on the same scale as the margin heads'
    cosine geometry and cannot be lowered by shrinking the embeddings.  The centres are an
    ``nn.Parameter`` trained by gradient (initialised as random unit vectors). ``lr=None`` trains
    them with the model's optimiser, lr and schedule (like a head's class weights); a number gives
    them that fixed lr in a param group of their own.  Under AdamW that number is a per-step move
    of each coordinate, not the paper's SGD-style alpha: 0.5 there throws unit-norm centres far
    off the sphere within a few steps (measured: loss ~100 instead of <= 2).
    """

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        lr: float | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        _require(lr is None or (math.isfinite(lr) and lr > 0), "lr", f"(center loss) must be > 0, got {lr}")
        self.num_classes, self.embedding_dim = num_classes, embedding_dim
        self.lr = None if lr is None else float(lr)
        centers = torch.randn(num_classes, embedding_dim, device=device, dtype=dtype)
        self.centers = nn.Parameter(F.normalize(centers, dim=1))

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        _check_batch(emb, labels)
        diff = _normalized(emb) - self.centers[labels]
        return 0.5 * diff.pow(2).sum(dim=1).mean()

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, embedding_dim={self.embedding_dim}, lr={self.lr}"


class NPairLoss(nn.Module):
    """Multi-class N-pair loss (Sohn 2016) on cosine similarities divided by ``temperature``.

    One (anchor, positive) pair per class with two or more samples
    (:func:`~trainer.losses.miners.npair_indices`); each anchor's positive competes in a
    softmax against the other anchors' positives:
    ``mean_i -log softmax_j(cos(a_i, p_j) / T)[i]``, which equals Sohn's
    ``log(1 + sum_{j != i} exp(f_i.f_j+ - f_i.f_i+))`` at ``T = 1``.  On unit vectors those
    logits span only [-1, 1], hence the temperature.  Fewer than two pairs: zero.
    """

    def __init__(self, temperature: float = 0.1):
        super().__init__()
        _require(math.isfinite(temperature) and temperature > 0, "temperature", f"must be > 0, got {temperature}")
        self.temperature = float(temperature)

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        _check_batch(emb, labels)
        anchor, positive = npair_indices(labels)
        if anchor.numel() < 2:
            return _no_tuple(emb)
        sim = cosine_similarity_matrix(emb)
        logits = sim[anchor][:, positive] / self.temperature
        target = torch.arange(anchor.numel(), device=logits.device)
        return F.cross_entropy(logits, target)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"


class CircleLoss(nn.Module):
    """Circle loss (Sun et al. 2020), pair-based form over all pairs of the batch.

    Per anchor with positives ``s_p`` and negatives ``s_n`` (cosine similarities)::

        L = softplus(logsumexp(gamma * a_n * (s_n - m)) + logsumexp(-gamma * a_p * (s_p - 1 + m)))
        a_p = relu(1 + m - s_p),  a_n = relu(s_n + m)

    averaged over the anchors that have at least one positive and one negative.  The weights
    ``a_p, a_n`` are treated as constants in the backward pass (``detach_weights=True``), as
    the paper's gradient analysis and its reference code do; ``detach_weights=False`` gives
    the full derivative.
    """

    def __init__(self, m: float = 0.25, gamma: float = 256.0, detach_weights: bool = True):
        super().__init__()
        _require(0.0 <= m < 1.0, "m", f"(circle loss) must be in [0, 1), got {m}")
        _require(math.isfinite(gamma) and gamma > 0, "gamma", f"(circle loss) must be > 0, got {gamma}")
        self.m, self.gamma, self.detach_weights = float(m), float(gamma), detach_weights

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        _check_batch(emb, labels)
        return circle_loss_from_similarity(
            cosine_similarity_matrix(emb), labels, self.m, self.gamma, self.detach_weights, zero=_no_tuple(emb)
        )

    def extra_repr(self) -> str:
        return f"m={self.m}, gamma={self.gamma}, detach_weights={self.detach_weights}"


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


class SupConLoss(nn.Module):
    """Supervised contrastive loss (Khosla et al. 2020, the ``L_out`` form).

    ``L_i = -1/|P(i)| sum_{p in P(i)} log(exp(s_ip / T) / sum_{a != i} exp(s_ia / T))``,
    averaged over the anchors with at least one positive; the others are excluded.
    """

    def __init__(self, temperature: float = 0.1):
        super().__init__()
        _require(math.isfinite(temperature) and temperature > 0, "temperature", f"must be > 0, got {temperature}")
        self.temperature = float(temperature)

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        _check_batch(emb, labels)
        a1, p, _, _ = all_pairs(labels)
        if a1.numel() == 0:
            return _no_tuple(emb)
        sim = cosine_similarity_matrix(emb)
        eye = torch.eye(sim.shape[0], dtype=torch.bool, device=sim.device)
        log_prob = F.log_softmax((sim / self.temperature).masked_fill(eye, float("-inf")), dim=1)
        batch = sim.shape[0]
        total = log_prob.new_zeros(batch).index_add(0, a1, log_prob[a1, p])
        count = torch.bincount(a1, minlength=batch)
        has_pos = count > 0
        return -(total[has_pos] / count[has_pos]).mean()

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"
