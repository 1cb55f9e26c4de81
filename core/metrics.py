"""Face-verification metrics over similarity scores (numpy only).

Conventions shared by every function: ``scores`` is a 1-D float array (higher = more alike),
``labels`` a 1-D array of 1 (same person) / 0 (different); a pair is called "same" when
``score >= threshold``. FAR (false accept rate) is the fraction of different pairs called same,
TAR (true accept rate) the fraction of same pairs called same. Both classes must be present.

The stable entry point is :func:`verification_metrics`; the trainer uses it for validation.
"""

from __future__ import annotations

import numpy as np

from .errors import FacefuseError

FAR_TARGETS = (1e-2, 1e-3)


def _check(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel().astype(bool)
    if s.shape != y.shape:
        raise FacefuseError(f"{s.size} scores but {y.size} labels")
    if not np.all(np.isfinite(s)):
        raise FacefuseError("scores contain NaN or infinity")
    if y.all() or not y.any():
        raise FacefuseError("verification metrics need both same-person and different-person pairs")
    return s, y


def roc_curve(scores, labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC operating points ``(far, tar, thresholds)``, one per distinct score.

    ``thresholds`` is decreasing and starts at ``+inf`` (nothing accepted: far = tar = 0); point
    ``k`` accepts every pair with ``score >= thresholds[k]``; the last point accepts all pairs.
    Tied scores form a single point (the same as ``sklearn.metrics.roc_curve(...,
    drop_intermediate=False)``).
    """
    s, y = _check(scores, labels)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]
    tp = np.cumsum(y)[last_of_tie]
    fp = np.cumsum(~y)[last_of_tie]
    far = np.r_[0.0, fp / fp[-1]]
    tar = np.r_[0.0, tp / tp[-1]]
    return far, tar, np.r_[np.inf, s[last_of_tie]]


def roc_auc(scores, labels) -> float:
    """Area under the ROC polyline (trapezoids): P(score_same > score_diff) + P(tie) / 2."""
    far, tar, _ = roc_curve(scores, labels)
    return float(np.sum(np.diff(far) * (tar[1:] + tar[:-1]) / 2))


def eer(scores, labels) -> float:
    """Equal error rate: where FAR equals FRR = 1 - TAR along the ROC polyline.

    ``FAR - FRR`` goes from -1 (first point) to +1 (last point); between the two neighbouring
    points where it changes sign, FAR and TAR are interpolated linearly and the crossing is
    returned (at that point FAR == FRR exactly).
    """
    far, tar, _ = roc_curve(scores, labels)
    d = far - (1 - tar)
    k = int(np.flatnonzero(d >= 0)[0])  # d[0] = -1, d[-1] = +1, so 1 <= k
    t = -d[k - 1] / (d[k] - d[k - 1])
    return float(far[k - 1] + t * (far[k] - far[k - 1]))


def tar_at_far(scores, labels, far_target: float) -> float:
    """TAR at a FAR target, read off the ROC polyline by linear interpolation.

    Between two neighbouring operating points the polyline is what a threshold chosen at random
    between them achieves, so the value is attainable. Where several points share a FAR (a
    vertical step) the highest TAR counts; a target inside a horizontal segment interpolates between
    that segment's ends, so e.g. a target below the smallest non-zero FAR interpolates from the last
    point with FAR 0.
    """
    if not 0.0 <= far_target <= 1.0:
        raise FacefuseError(f"FAR target must be in [0, 1], got {far_target}")
    far, tar, _ = roc_curve(scores, labels)
    i = int(np.searchsorted(far, far_target, side="right")) - 1  # last point with far <= target
    if far[i] == far_target or i == far.size - 1:
        return float(tar[i])
    w = (far_target - far[i]) / (far[i + 1] - far[i])
    return float(tar[i] + w * (tar[i + 1] - tar[i]))


def _thresholds_between(s: np.ndarray) -> np.ndarray:
    """Thresholds that separate every pair of neighbouring distinct scores, plus both ends."""
    u = np.unique(s)
    mids = (u[1:] + u[:-1]) / 2
    return np.r_[np.nextafter(u[-1], np.inf), mids[::-1], u[0]]


def best_threshold(scores, labels) -> tuple[float, float]:
    """``(threshold, accuracy)`` maximising accuracy of ``score >= threshold``.

    Candidate thresholds lie halfway between neighbouring distinct scores (plus one above the
    maximum and the minimum itself), so the chosen one sits in the middle of its gap rather than
    on a training score. Ties in accuracy go to the highest threshold.
    """
    s, y = _check(scores, labels)
    far, tar, _ = roc_curve(s, y)
    n_pos, n_neg = y.sum(), (~y).sum()
    acc = (tar * n_pos + (1 - far) * n_neg) / y.size
    k = int(np.argmax(acc))
    return float(_thresholds_between(s)[k]), float(acc[k])


def threshold_at_far(impostor_scores, far: float) -> tuple[float, int]:
    """The smallest float32 threshold ``t`` whose false accept rate on ``impostor_scores`` is at
    most ``far``, and how many impostors it accepts (``score >= t``).

    With ``n`` impostor scores and ``k = floor(far * n)`` accepts allowed, ``t`` is the next float32
    above the ``(k+1)``-th highest score, so exactly the scores strictly above it are accepted. Ties:
    impostors tied at that score are all rejected (accepting one would accept them all), so the
    realised rate may be below ``far``; it never exceeds it. Scores are compared in float32, as
    verification computes them.
    """
    s = np.asarray(impostor_scores, dtype=np.float32).ravel()
    if s.size == 0:
        raise FacefuseError("a threshold at a FAR needs impostor scores")
    if not np.all(np.isfinite(s)):
        raise FacefuseError("scores contain NaN or infinity")
    if not 0.0 < far < 1.0:
        raise FacefuseError(f"FAR must be in (0, 1), got {far}")
    k = int(np.floor(far * s.size * (1 + 1e-12)))  # 0.29 * 100 is 28.999...96 in floats: count 29
    boundary = np.partition(s, s.size - 1 - k)[s.size - 1 - k]  # the (k+1)-th highest
    t = np.nextafter(boundary, np.float32(np.inf))
    return float(t), int(np.count_nonzero(s >= t))


def rates_at_threshold(scores, labels, threshold: float) -> dict:
    """What deciding ``score >= threshold`` gives on labelled pairs, for whichever classes are
    present: ``tar`` (None without same-person pairs), ``far`` (None without different-person
    pairs), ``accuracy``, and the pair counts."""
    s = np.asarray(scores, dtype=np.float32).ravel()
    y = np.asarray(labels).ravel().astype(bool)
    accept = s >= np.float32(threshold)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    return {"threshold": float(threshold),
            "tar": float(accept[y].mean()) if n_pos else None,
            "far": float(accept[~y].mean()) if n_neg else None,
            "accuracy": float(np.mean(accept == y)) if y.size else None,
            "genuine_pairs": n_pos, "impostor_pairs": n_neg}


def accuracy(scores, labels, threshold: float) -> float:
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel().astype(bool)
    return float(np.mean((s >= threshold) == y))


def split_folds(labels, n_folds: int = 10) -> np.ndarray:
    """Fold index per pair for ``n_folds``-way cross-validation inside one set of pairs.

    Done the way LFW's folds are made: the same pairs, in file order, are cut into ``n_folds``
    contiguous parts of (nearly) equal size, and the different pairs likewise, so every fold has
    its share of both classes.
    """
    y = np.asarray(labels).ravel().astype(bool)
    folds = np.empty(y.size, dtype=np.int64)
    for cls in (True, False):
        idx = np.flatnonzero(y == cls)
        folds[idx] = np.arange(idx.size) * n_folds // max(idx.size, 1)
    return folds


def kfold_accuracy(scores, labels, folds) -> tuple[float, float, np.ndarray, np.ndarray]:
    """Protocol accuracy: for each fold, the threshold is chosen on the other folds
    (:func:`best_threshold`) and the accuracy measured on the held-out fold.

    Returns ``(mean, std, per_fold_accuracy, per_fold_threshold)``; ``std`` is the population
    standard deviation over folds (``np.std``, as LFW results are usually reported).
    """
    s, y = _check(scores, labels)
    f = np.asarray(folds).ravel()
    if f.shape != s.shape:
        raise FacefuseError(f"{s.size} scores but {f.size} fold indices")
    ids = np.unique(f)
    if ids.size < 2:
        raise FacefuseError("k-fold accuracy needs at least two folds")
    accs, ths = [], []
    for k in ids:
        test = f == k
        th, _ = best_threshold(s[~test], y[~test])
        ths.append(th)
        accs.append(accuracy(s[test], y[test], th))
    accs = np.array(accs)
    return float(accs.mean()), float(accs.std()), accs, np.array(ths)


def verification_metrics(scores, labels, folds=None, n_splits: int = 10) -> dict:
    """All verification figures in one dict.

    Keys: ``roc_auc``, ``eer``, ``tar_at_far_1e-2``, ``tar_at_far_1e-3``, ``best_threshold``,
    ``best_accuracy`` (threshold fit on all pairs: optimistic) and, when ``folds`` is given,
    ``kfold_accuracy``, ``kfold_std``, ``kfold_n``. A ``folds`` array with a single fold (LFW's
    development files) is split with :func:`split_folds` into ``n_splits`` parts first.
    """
    s, y = _check(scores, labels)
    th, acc = best_threshold(s, y)
    out = {
        "n_pairs": int(s.size),
        "roc_auc": roc_auc(s, y),
        "eer": eer(s, y),
        **{f"tar_at_far_{t:.0e}".replace("e-0", "e-"): tar_at_far(s, y, t) for t in FAR_TARGETS},
        "best_threshold": th,
        "best_accuracy": acc,
    }
    if folds is not None:
        f = np.asarray(folds).ravel()
        if np.unique(f).size == 1:
            f = split_folds(y, n_splits)
        mean, std, _, _ = kfold_accuracy(s, y, f)
        out.update(kfold_accuracy=mean, kfold_std=std, kfold_n=int(np.unique(f).size))
    return out
