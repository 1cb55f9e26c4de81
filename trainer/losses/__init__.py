"""Losses of the trainer: classification heads (:mod:`.margin`), pair losses (:mod:`.pair`) and
their miners (:mod:`.miners`), each kind in one registry (``HEADS``, ``PAIR_LOSSES``, ``MINERS``)
filled next to the definitions, and built by name with :func:`build_head` / :func:`build_pair_loss`.
"""

from __future__ import annotations

from facefuse.trainer.losses.margin import (
    HEADS,
    ArcFace,
    CombinedMargin,
    CosFace,
    HeadOutput,
    MarginHead,
    NamedMarginHead,
    NormFace,
    SoftmaxHead,
    SphereFace,
    build_head,
)
from facefuse.trainer.losses.adaptive import AdaFace, SubCenterArcFace
from facefuse.trainer.losses.miners import MINERS, AnchorPositiveIndices, PairIndices, TripletIndices
from facefuse.trainer.losses.pair import (
    PAIR_LOSSES,
    CenterLoss,
    CircleLoss,
    NPairLoss,
    PairLoss,
    SupConLoss,
    TripletLoss,
    build_pair_loss,
    pair_loss_settings,
)

CLASSIFICATION_HEADS = HEADS  # the former name, kept until its users move to HEADS

__all__ = [
    "AdaFace",
    "AnchorPositiveIndices",
    "ArcFace",
    "CLASSIFICATION_HEADS",
    "CenterLoss",
    "CircleLoss",
    "CombinedMargin",
    "CosFace",
    "HEADS",
    "HeadOutput",
    "MINERS",
    "MarginHead",
    "NPairLoss",
    "NamedMarginHead",
    "NormFace",
    "PAIR_LOSSES",
    "PairIndices",
    "PairLoss",
    "SoftmaxHead",
    "SphereFace",
    "SubCenterArcFace",
    "SupConLoss",
    "TripletIndices",
    "TripletLoss",
    "build_head",
    "build_pair_loss",
    "pair_loss_settings",
]
