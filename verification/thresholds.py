"""Decision thresholds: the rule that finds them from scores, and reading the ones a model stores.

For each target false accept rate ``f`` the threshold is the smallest float32 cosine ``t`` such that
the fraction of impostor scores ``>= t`` is at most ``f`` (:func:`core.metrics.threshold_at_far`;
impostors tied at the boundary are all rejected), with the TAR of the genuine scores at ``t``; and the
best-accuracy threshold (:func:`core.metrics.best_threshold`).

A FAR is only kept when at least 10 impostor pairs would be accepted at it (``f >= 10 / n``): the
default targets (1e-2, 1e-3, 1e-4) that the impostor count does not support are left out; one asked
for explicitly is refused. :mod:`verification.calibrate` stores the record in the model;
``verify`` and ``search`` then decide at the stored threshold by default: :func:`stored_threshold`
picks the FAR asked for, or else the stored FAR nearest 1e-3 on a log scale (the stricter on a tie).
"""

from __future__ import annotations

import math

import numpy as np

from facefuse.core import metrics
from facefuse.core.errors import FacefuseError, ParameterError
from facefuse.core.settings import EmbedSettings, settings_mismatch

DEFAULT_FARS = (1e-2, 1e-3, 1e-4)
DEFAULT_FAR = 1e-3           # the stored FAR verify/search use when none is asked for (nearest on a log scale)
MIN_ACCEPTED = 10            # a FAR must let at least this many impostors through: f >= 10 / n
RULE = ("same if cosine >= threshold; threshold at FAR f = smallest float32 t with "
        "#(impostor scores >= t) <= f * #impostors (impostors tied at the boundary are rejected)")


# ---------------------------------------------------------------- FAR targets


def check_fars(fars, param: str = "fars") -> tuple[float, ...]:
    """Every FAR in (0, 1), as given (duplicates dropped, sorted loosest first)."""
    for f in fars:
        if not (isinstance(f, (int, float)) and 0.0 < f < 1.0):
            raise ParameterError(param, f, "a false accept rate must be in (0, 1)")
    return tuple(sorted(set(float(f) for f in fars), reverse=True))


def supported_fars(fars, n_impostors: int, explicit: bool) -> tuple[float, ...]:
    """The FARs that ``n_impostors`` supports (``f >= 10 / n``). Asked-for ones below that are an
    error; default ones are dropped, and an error only when none is left."""
    floor = MIN_ACCEPTED / max(n_impostors, 1)
    low = [f for f in fars if f < floor * (1 - 1e-12)]
    if explicit and low:
        raise ParameterError("fars", low[-1], f"below what {n_impostors} impostor pairs support "
                             f"(at least {MIN_ACCEPTED}/{n_impostors} = {floor:.3g}); give more impostor pairs")
    kept = tuple(f for f in fars if f not in low)
    if not kept:
        raise FacefuseError(f"{n_impostors} impostor pairs support no FAR of {', '.join(f'{f:g}' for f in fars)} "
                            f"(at least {floor:.3g}); give more impostor pairs (impostors=) or a larger fars=")
    return kept


# ---------------------------------------------------------------- thresholds from scores


def thresholds_from_scores(genuine, impostor, fars=None) -> dict:
    """``{"at_far": [...], "best_accuracy": {...}}`` from genuine and impostor scores (see the module
    docstring); ``fars`` None means the supported ones of :data:`DEFAULT_FARS`."""
    g = np.asarray(genuine, dtype=np.float32).ravel()
    i = np.asarray(impostor, dtype=np.float32).ravel()
    if g.size == 0:
        raise FacefuseError("calibration needs genuine (same-person) pairs, and there are none")
    if i.size == 0:
        raise FacefuseError("calibration needs impostor (different-person) pairs, and there are none")
    explicit = fars is not None and len(fars) > 0
    targets = supported_fars(check_fars(fars if explicit else DEFAULT_FARS), i.size, explicit)
    at_far = []
    for f in targets:
        t, accepted = metrics.threshold_at_far(i, f)
        at_far.append({"far": f, "threshold": t, "tar": float(np.mean(g >= np.float32(t))),
                       "realised_far": accepted / i.size, "accepted_impostors": accepted})
    scores = np.r_[g, i]
    labels = np.r_[np.ones(g.size, np.int8), np.zeros(i.size, np.int8)]
    best_t, best_acc = metrics.best_threshold(scores, labels)
    return {"at_far": at_far, "best_accuracy": {"threshold": best_t, "accuracy": best_acc}}


# ---------------------------------------------------------------- reading a stored threshold


def stored_threshold(meta, far: float | None = None, where: str = "the model") -> tuple[float | None, str | None]:
    """``(threshold, source)`` from a model's calibrated thresholds: the one at ``far`` (which must
    be stored), else the stored FAR nearest :data:`DEFAULT_FAR` on a log scale (the stricter on a
    tie). ``(None, None)`` for a model without thresholds, unless ``far`` was asked for (an error)."""
    th = getattr(meta, "thresholds", None) or {}
    entries = th.get("at_far") or []
    if not entries:
        if far is not None:
            raise ParameterError("far", far, f"{where} has no calibrated thresholds; run `facefuse calibrate` first")
        return None, None
    fp = th.get("provenance", {}).get("fingerprint")
    if fp and meta.fingerprint and fp != meta.fingerprint:
        raise FacefuseError(f"{where}: its stored thresholds were calibrated for model {fp}, not this one "
                            f"({meta.fingerprint}); run `facefuse calibrate` again")
    if far is None:
        pick = min(entries, key=lambda e: (round(abs(math.log10(e["far"] / DEFAULT_FAR)), 9), e["far"]))
    else:
        match = [e for e in entries if math.isclose(e["far"], far, rel_tol=1e-6)]
        if not match:
            have = ", ".join(f"{e['far']:g}" for e in entries)
            raise ParameterError("far", far, f"{where} stores thresholds at FAR {have} only")
        pick = match[0]
    src = th.get("provenance", {}).get("source", "?")
    return float(pick["threshold"]), f"calibrated at FAR {pick['far']:g} on {src}"


def resolve_threshold(meta, threshold: float | None, far: float | None, where: str):
    """``(threshold, source)``: ``threshold`` if given, else the model's calibrated threshold at
    ``far`` (default: :func:`stored_threshold`'s choice), else ``(None, None)``."""
    if threshold is not None and far is not None:
        raise ParameterError("threshold", threshold, "give threshold= or far=, not both")
    if threshold is not None:
        if not np.isfinite(threshold):
            raise ParameterError("threshold", threshold, "must be a finite number")
        return float(threshold), "threshold given"
    return stored_threshold(meta, far, where)


def calibrated_settings(meta) -> EmbedSettings:
    """The settings a model's stored threshold was calibrated under (defaults for records without them)."""
    return EmbedSettings.from_record((getattr(meta, "thresholds", None) or {}).get("provenance"))


def calibration_mismatch(meta, settings: EmbedSettings) -> str | None:
    """Why the model's stored threshold may not hold for a run with ``settings`` (it was calibrated
    under other flip / align / center settings), or None."""
    why = settings_mismatch(calibrated_settings(meta), settings, made="calibrated")
    if why is None:
        return None
    return f"the stored threshold was {why}: its FAR may not hold (calibrate again with these settings)"
