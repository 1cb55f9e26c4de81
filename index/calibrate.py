"""Calibrated decision thresholds, stored in the model they belong to.

``calibrate`` scores labelled pairs (a pairs file of any format :mod:`core.pairs` reads, or a folder
of identity sub-folders: every genuine pair plus a seeded sample of impostor pairs), then finds

- for each target false accept rate ``f``: the smallest float32 cosine ``t`` such that the
  fraction of impostor scores ``>= t`` is at most ``f`` (:func:`core.metrics.threshold_at_far`;
  impostors tied at the boundary are all rejected), and the TAR of the genuine scores at ``t``;
- the best-accuracy threshold (:func:`core.metrics.best_threshold`).

A FAR is only kept when at least 10 impostor pairs would be accepted at it (``f >= 10 / n``): the
default targets (1e-2, 1e-3, 1e-4) that the impostor count does not support are left out; one asked
for explicitly is refused. The record (``ModelMeta.thresholds``) is::

    {"version": 1,
     "rule": "...",
     "at_far": [{"far": 0.001, "threshold": 0.41, "tar": 0.93, "realised_far": 0.00098,
                 "accepted_impostors": 98}, ...],        # loosest FAR first
     "best_accuracy": {"threshold": 0.37, "accuracy": 0.95},
     "provenance": {"source": "pairs.txt", "source_kind": "pairs" | "folder", "genuine_pairs": ...,
                    "impostor_pairs": ..., "images": ..., "skipped_images": ..., "identities": ...,
                    "seed": ..., "flip_tta": false, "detect": "none", "date": "2025-...Z", "facefuse_version": "0.2.0",
                    "fingerprint": "<model fingerprint>"}}

and is written into the model file itself (``export.runtime.write_thresholds``: ONNX metadata or
the checkpoint's model metadata), atomically. ``verify`` and ``search`` then decide at the stored
threshold by default: :func:`stored_threshold` picks the FAR asked for, or else the stored FAR
nearest 1e-3 on a log scale (the stricter one on a tie).
"""

from __future__ import annotations

import datetime
import math
from pathlib import Path

import numpy as np

from facefuse.core import metrics
from facefuse.core.errors import FacefuseError
from facefuse.core.pairs import read_pairs
from facefuse.core.folders import scan_identity_folder

DEFAULT_FARS = (1e-2, 1e-3, 1e-4)
DEFAULT_IMPOSTORS = 1_000_000
DEFAULT_FAR = 1e-3           # the stored FAR verify/search use when none is asked for (nearest on a log scale)
MIN_ACCEPTED = 10            # a FAR must let at least this many impostors through: f >= 10 / n
RULE = ("same if cosine >= threshold; threshold at FAR f = smallest float32 t with "
        "#(impostor scores >= t) <= f * #impostors (impostors tied at the boundary are rejected)")


# ---------------------------------------------------------------- FAR targets


def check_fars(fars) -> tuple[float, ...]:
    """Every FAR in (0, 1), as given (duplicates dropped, sorted loosest first)."""
    for f in fars:
        if not (isinstance(f, (int, float)) and 0.0 < f < 1.0):
            raise FacefuseError(f"--far {f}: a false accept rate must be in (0, 1)")
    return tuple(sorted(set(float(f) for f in fars), reverse=True))


def supported_fars(fars, n_impostors: int, explicit: bool) -> tuple[float, ...]:
    """The FARs that ``n_impostors`` supports (``f >= 10 / n``). Asked-for ones below that are an
    error; default ones are dropped, and an error only when none is left."""
    floor = MIN_ACCEPTED / max(n_impostors, 1)
    low = [f for f in fars if f < floor * (1 - 1e-12)]
    if explicit and low:
        raise FacefuseError(f"--far {low[-1]:g}: below what {n_impostors} impostor pairs support "
                            f"(at least {MIN_ACCEPTED}/{n_impostors} = {floor:.3g}); give more impostor pairs")
    kept = tuple(f for f in fars if f not in low)
    if not kept:
        raise FacefuseError(f"{n_impostors} impostor pairs support no FAR of {', '.join(f'{f:g}' for f in fars)} "
                            f"(at least {floor:.3g}); give more impostor pairs (--impostors) or a larger --far")
    return kept


# ---------------------------------------------------------------- pairs from identity labels


def scan_identities(folder: str | Path) -> tuple[list[Path], np.ndarray, list[str]]:
    """Images of an identity folder (as a gallery folder is read: :func:`core.folders.scan_identity_folder`):
    ``(paths, identity index per image, names)``."""
    paths, identities = scan_identity_folder(folder)
    names = list(dict.fromkeys(identities))
    index = {n: i for i, n in enumerate(names)}
    return paths, np.array([index[n] for n in identities], dtype=np.int64), names


def genuine_pairs(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every pair ``(i, j)``, ``i < j``, of images with the same identity."""
    ia, ib = [], []
    order = np.argsort(ids, kind="stable")
    bounds = np.flatnonzero(np.diff(ids[order])) + 1
    for group in np.split(order, bounds):
        if group.size > 1:
            a, b = np.triu_indices(group.size, k=1)
            ia.append(group[a])
            ib.append(group[b])
    if not ia:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(ia).astype(np.int64), np.concatenate(ib).astype(np.int64)


def impostor_pairs(ids: np.ndarray, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``n`` distinct pairs ``(i, j)``, ``i < j``, of images of different identities: all of
    them when there are at most ``n``, else a uniform sample without replacement (seeded)."""
    m = ids.size
    counts = np.bincount(ids)
    total = (m * m - int(np.sum(counts.astype(np.int64) ** 2))) // 2
    rng = np.random.default_rng(seed)
    if total <= 2 * n:  # enumerating is cheap here, and rejection sampling would crawl near the end
        ia, ib = _all_impostors(ids)
        if total <= n:
            return ia, ib
        pick = np.sort(rng.choice(total, n, replace=False))
        return ia[pick], ib[pick]
    keys = np.zeros(0, dtype=np.int64)
    while keys.size < n:
        draw = int((n - keys.size) * 1.3) + 64
        a, b = rng.integers(0, m, draw), rng.integers(0, m, draw)
        keep = ids[a] != ids[b]
        lo, hi = np.minimum(a, b)[keep], np.maximum(a, b)[keep]
        keys = np.union1d(keys, lo * m + hi)
    keys = rng.choice(keys, n, replace=False)  # np.union1d sorts: draw the n kept at random
    keys.sort()
    return keys // m, keys % m


def _all_impostors(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every different-identity pair, one identity's images against all later identities' at a time."""
    order = np.argsort(ids, kind="stable")
    groups = np.split(order, np.flatnonzero(np.diff(ids[order])) + 1)
    ia, ib = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    ends = np.cumsum([g.size for g in groups])
    for g, end in zip(groups[:-1], ends[:-1]):
        rest = order[end:]
        a, b = np.repeat(g, rest.size), np.tile(rest, g.size)
        ia.append(np.minimum(a, b))
        ib.append(np.maximum(a, b))
    return np.concatenate(ia).astype(np.int64), np.concatenate(ib).astype(np.int64)


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


# ---------------------------------------------------------------- the command


def calibrate(source: str | Path, model: str | Path, embedder=None, *, fars=None,
              impostors: int = DEFAULT_IMPOSTORS, seed: int = 0, root: str | Path | None = None,
              batch_size: int = 64, num_workers: int | None = None, flip_tta: bool = False,
              skip_missing: bool = False, progress: bool = False, write: bool = True, detect: str = "none",
              center: bool = False) -> dict:
    """Calibrate ``model`` on ``source`` (a labelled pairs file, or a folder of identity
    sub-folders) and, with ``write``, store the record in the model file. Returns the record.
    ``detect`` (``"haar"``) crops each image around its detected face first, as ``verify --detect``
    must then do too; ``center`` scores embeddings centred on the mean of the source's images
    (``core.vectors.center_rows``), as ``verify --center`` does on its pairs. The record's provenance
    keeps all three settings."""
    from facefuse.export.runtime import load_embedder, write_thresholds
    from facefuse.core.facecrop import face_crop
    from facefuse.core.vectors import center_rows
    from facefuse.index.verify import embed_images, pair_scores, score_pairs, test_time_settings

    if fars:
        check_fars(fars)
    if impostors < 1:
        raise FacefuseError(f"--impostors {impostors}: must be at least 1")
    source = Path(source)
    embedder = embedder or load_embedder(model)
    embedder.crop = face_crop(detect)
    kw = dict(batch_size=batch_size, num_workers=num_workers, flip_tta=flip_tta, skip_missing=skip_missing,
              progress=progress)
    if source.is_dir():
        paths, ids, names = scan_identities(source)
        ga, gb = genuine_pairs(ids)
        ia, ib = impostor_pairs(ids, impostors, seed)
        _check_counts(source, ga.size, ia.size, fars)
        emb, ok = embed_images(embedder, paths, **kw)
        if center:
            emb = center_rows(emb, ok, where=source.name)
        genuine, impostor = pair_scores(emb, ga, gb, ok), pair_scores(emb, ia, ib, ok)
        extra = {"source_kind": "folder", "identities": len(names), "images": len(paths),
                 "skipped_images": int((~ok).sum()), "seed": seed}
    else:
        pairs = read_pairs(source, root=root)
        if pairs.labels is None:
            raise FacefuseError(f"{source.name}: calibration needs labelled pairs (same/different), and it has none")
        y = pairs.labels.astype(bool)
        _check_counts(source, int(y.sum()), int((~y).sum()), fars)
        scores, _, skipped = score_pairs(pairs, embedder, center=center, **kw)
        genuine, impostor = scores[y], scores[~y]
        extra = {"source_kind": "pairs", "images": len(pairs.images), "skipped_images": skipped}
    genuine, impostor = genuine[~np.isnan(genuine)], impostor[~np.isnan(impostor)]
    _check_counts(source, genuine.size, impostor.size, None)
    try:
        record = thresholds_from_scores(genuine, impostor, fars)
    except FacefuseError as exc:
        raise FacefuseError(f"{source.name}: {exc}") from None
    record = {"version": 1, "rule": RULE, **record,
              "provenance": {"source": source.name, **extra, "genuine_pairs": int(genuine.size),
                             "impostor_pairs": int(impostor.size), **test_time_settings(flip_tta, embedder.crop, center),
                             "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                             "facefuse_version": _version(), "fingerprint": embedder.fingerprint}}
    if write:
        write_thresholds(model, record)
    return record


def _check_counts(source: Path, n_genuine: int, n_impostor: int, fars) -> None:
    """Refuse before embedding anything when a class is missing or an asked FAR is unsupported."""
    if n_genuine == 0:
        raise FacefuseError(f"{source.name}: calibration needs genuine (same-person) pairs, and there are none")
    if n_impostor == 0:
        raise FacefuseError(f"{source.name}: calibration needs impostor (different-person) pairs, "
                            "and there are none")
    if fars:
        try:
            supported_fars(check_fars(fars), n_impostor, explicit=True)
        except FacefuseError as exc:
            raise FacefuseError(f"{source.name}: {exc}") from None


def _version() -> str:
    import facefuse

    return facefuse.__version__


# ---------------------------------------------------------------- reading a stored threshold


def stored_threshold(meta, far: float | None = None, where: str = "the model") -> tuple[float | None, str | None]:
    """``(threshold, source)`` from a model's calibrated thresholds: the one at ``far`` (which must
    be stored), else the stored FAR nearest :data:`DEFAULT_FAR` on a log scale (the stricter on a
    tie). ``(None, None)`` for a model without thresholds, unless ``far`` was asked for (an error)."""
    th = getattr(meta, "thresholds", None) or {}
    entries = th.get("at_far") or []
    if not entries:
        if far is not None:
            raise FacefuseError(f"--far {far:g}: {where} has no calibrated thresholds; run `facefuse calibrate` first")
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
            raise FacefuseError(f"--far {far:g}: {where} stores thresholds at FAR {have} only")
        pick = match[0]
    src = th.get("provenance", {}).get("source", "?")
    return float(pick["threshold"]), f"calibrated at FAR {pick['far']:g} on {src}"
