"""Losses of the trainer: classification heads (:mod:`.margin`), pair losses (:mod:`.pair`)
and their miners (:mod:`.miners`), built by name from two plain dicts."""

from __future__ import annotations

import inspect

from torch import nn

from facefuse.trainer.losses.margin import (
    ArcFace,
    CombinedMargin,
    CosFace,
    HeadOutput,
    MarginHead,
    NormFace,
    SoftmaxHead,
    SphereFace,
)
from facefuse.trainer.losses.miners import AnchorPositiveIndices, PairIndices, TripletIndices
from facefuse.trainer.losses.pair import CenterLoss, CircleLoss, NPairLoss, SupConLoss, TripletLoss

CLASSIFICATION_HEADS = {
    "softmax": SoftmaxHead,
    "normface": NormFace,
    "arcface": ArcFace,
    "cosface": CosFace,
    "sphereface": SphereFace,
    "combined": CombinedMargin,
}

PAIR_LOSSES = {
    "triplet": TripletLoss,
    "center": CenterLoss,
    "npair": NPairLoss,
    "circle": CircleLoss,
    "supcon": SupConLoss,
}

_NEUTRAL_MARGINS = {"m1": 1.0, "m2": 0.0, "m3": 0.0}


def _init_params(cls: type) -> set[str]:
    """Named ``__init__`` parameters of ``cls``, following ``**kwargs`` up to the base classes."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        params = inspect.signature(klass.__init__).parameters.values()
        names |= {p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return names - {"self"}


def _lookup(table: dict, kind: str, name: str):
    if name not in table:
        raise ValueError(f"unknown {kind} {name!r}; valid: {', '.join(table)}")
    return table[name]


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
    label_smoothing: float = 0.0,
    kernel_backend: str = "torch",
) -> nn.Module:
    """A classification head by name.

    ``margin=None`` keeps the head's own default (arcface 0.5, cosface 0.35, sphereface 1.35);
    softmax and normface ignore ``margin`` (softmax also ``s``).  ``m1, m2, m3`` are for
    ``"combined"`` only: non-neutral values with another head, or ``margin`` with
    ``"combined"``, raise ``ValueError`` rather than being silently dropped.
    """
    cls = _lookup(CLASSIFICATION_HEADS, "classification head", name)
    accepted = _init_params(cls)
    given = {"s": s, "label_smoothing": label_smoothing, "kernel_backend": kernel_backend}
    if margin is not None and "margin" in accepted:
        given["margin"] = margin
    if "m1" in accepted:
        if margin is not None:
            raise ValueError(f"margin: the {name!r} head takes m1, m2, m3, not margin")
        given.update(m1=m1, m2=m2, m3=m3)
    else:
        stray = [k for k, v in dict(m1=m1, m2=m2, m3=m3).items() if v != _NEUTRAL_MARGINS[k]]
        if stray:
            raise ValueError(f"{', '.join(stray)}: only the 'combined' head takes m1, m2, m3; use margin= for {name!r}")
    return cls(embedding_dim, num_classes, **{k: v for k, v in given.items() if k in accepted})


def build_pair_loss(name: str, embedding_dim: int, num_classes: int, **kwargs) -> nn.Module:
    """A pair loss by name; ``kwargs`` are its constructor's hyper-parameters (``margin``,
    ``mining``, ``temperature``, ``m``, ``gamma``, ``lr`` ...).  ``embedding_dim`` and
    ``num_classes`` are passed to the losses that need them (the center loss)."""
    cls = _lookup(PAIR_LOSSES, "pair loss", name)
    accepted = _init_params(cls)
    unknown = sorted(set(kwargs) - accepted - {"embedding_dim", "num_classes"})
    if unknown:
        valid = sorted(accepted - {"embedding_dim", "num_classes", "device", "dtype"})
        raise ValueError(f"{', '.join(unknown)}: not a parameter of the {name!r} loss; valid: {', '.join(valid)}")
    sizes = {"embedding_dim": embedding_dim, "num_classes": num_classes}
    return cls(**{k: v for k, v in sizes.items() if k in accepted}, **kwargs)


__all__ = [
    "AnchorPositiveIndices",
    "ArcFace",
    "CLASSIFICATION_HEADS",
    "CenterLoss",
    "CircleLoss",
    "CombinedMargin",
    "CosFace",
    "HeadOutput",
    "MarginHead",
    "NPairLoss",
    "NormFace",
    "PAIR_LOSSES",
    "PairIndices",
    "SoftmaxHead",
    "SphereFace",
    "SupConLoss",
    "TripletIndices",
    "TripletLoss",
    "build_head",
    "build_pair_loss",
]
