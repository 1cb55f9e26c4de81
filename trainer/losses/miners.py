"""Miners: which (anchor, positive, negative) index tuples of a batch a pair loss uses.

Miners see only labels and a detached distance matrix and return typed index tuples; the
losses gather their terms from the similarity matrix with them, so gradients never pass
through the selection.  A positive of ``a`` is another sample with the same label, a
negative one with a different label.

The triplet miners are registered in :data:`MINERS` (``batch_hard``, ``semi_hard``, ``all``); each
is ``miner(dist, labels, margin) -> TripletIndices``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from facefuse.core.registry import Registry

MINERS = Registry("miner")


class TripletIndices(NamedTuple):
    anchor: torch.Tensor
    positive: torch.Tensor
    negative: torch.Tensor


class PairIndices(NamedTuple):
    """Positive pairs ``(a1[k], p[k])`` and negative pairs ``(a2[k], n[k])``."""

    a1: torch.Tensor
    p: torch.Tensor
    a2: torch.Tensor
    n: torch.Tensor


class AnchorPositiveIndices(NamedTuple):
    """One ``(anchor, positive)`` pair per class, for the N-pair loss."""

    anchor: torch.Tensor
    positive: torch.Tensor


def label_masks(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(positive, negative)`` B x B boolean masks; the diagonal is in neither."""
    same = labels.unsqueeze(0) == labels.unsqueeze(1)
    eye = torch.eye(labels.shape[0], dtype=torch.bool, device=labels.device)
    return same & ~eye, ~same


def all_pairs(labels: torch.Tensor) -> PairIndices:
    """Every positive and every negative ordered pair of the batch."""
    pos, neg = label_masks(labels)
    a1, p = pos.nonzero(as_tuple=True)
    a2, n = neg.nonzero(as_tuple=True)
    return PairIndices(a1, p, a2, n)


@MINERS.register("batch_hard")
@torch.no_grad()
def batch_hard_triplets(dist: torch.Tensor, labels: torch.Tensor, margin: float = 0.0) -> TripletIndices:
    """Per anchor, its farthest positive and nearest negative (Hermans et al. 2017).

    Anchors without a positive or without a negative are left out; ``margin`` is unused.
    """
    pos, neg = label_masks(labels)
    hardest_pos = dist.masked_fill(~pos, float("-inf")).argmax(dim=1)
    hardest_neg = dist.masked_fill(~neg, float("inf")).argmin(dim=1)
    (anchor,) = (pos.any(dim=1) & neg.any(dim=1)).nonzero(as_tuple=True)
    return TripletIndices(anchor, hardest_pos[anchor], hardest_neg[anchor])


@MINERS.register("semi_hard")
@torch.no_grad()
def semi_hard_triplets(dist: torch.Tensor, labels: torch.Tensor, margin: float) -> TripletIndices:
    """One negative per positive pair ``(a, p)``, FaceNet's semi-hard rule made deterministic.

    * Semi-hard negatives lie farther than the positive but within the margin:
      ``d(a,p) < d(a,n) < d(a,p) + margin``; the nearest of them is chosen.
    * Fallback when there is none: the farthest negative with ``d(a,n) <= d(a,p)`` (the
      easiest hard one, as TensorFlow's ``triplet_semihard_loss`` does), so a batch whose
      negatives are all hard still trains without picking the hardest, collapse-prone ones.
    * Pairs with neither (every negative at ``d(a,p) + margin`` or farther, i.e. zero loss)
      are left out.
    """
    pos, neg = label_masks(labels)
    a, p = pos.nonzero(as_tuple=True)
    d_ap = dist[a, p].unsqueeze(1)  # P x 1
    d_an = dist[a]  # P x B
    neg_a = neg[a]
    band = neg_a & (d_an > d_ap) & (d_an < d_ap + margin)
    hard = neg_a & (d_an <= d_ap)
    semi = d_an.masked_fill(~band, float("inf")).argmin(dim=1)
    easiest_hard = d_an.masked_fill(~hard, float("-inf")).argmax(dim=1)
    has_band, has_hard = band.any(dim=1), hard.any(dim=1)
    negative = torch.where(has_band, semi, easiest_hard)
    keep = has_band | has_hard
    return TripletIndices(a[keep], p[keep], negative[keep])


@MINERS.register("all")
@torch.no_grad()
def all_triplets(dist: torch.Tensor, labels: torch.Tensor, margin: float = 0.0) -> TripletIndices:
    """Every valid triplet (``margin`` unused).  Builds a B x B x B mask: for small batches."""
    pos, neg = label_masks(labels)
    a, p, n = (pos.unsqueeze(2) & neg.unsqueeze(1)).nonzero(as_tuple=True)
    return TripletIndices(a, p, n)


def npair_indices(labels: torch.Tensor) -> AnchorPositiveIndices:
    """For each class with two or more samples, its first two samples in batch order
    (anchor, positive), classes in increasing label order; other samples are unused."""
    sorted_labels, order = torch.sort(labels, stable=True)
    _, counts = torch.unique_consecutive(sorted_labels, return_counts=True)
    starts = (torch.cumsum(counts, dim=0) - counts)[counts >= 2]
    return AnchorPositiveIndices(order[starts], order[starts + 1])
