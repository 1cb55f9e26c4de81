"""Calibrated decision thresholds, stored in the model they belong to.

``calibrate`` scores labelled pairs (a pairs file of any format :mod:`core.pairs` reads, or a folder
of identity sub-folders: every genuine pair plus a seeded sample of impostor pairs) and finds the
thresholds at target false accept rates by the rule of :mod:`verification.thresholds`. The record
(``ModelMeta.thresholds``) is::

    {"version": 1,
     "rule": "...",
     "at_far": [{"far": 0.001, "threshold": 0.41, "tar": 0.93, "realised_far": 0.00098,
                 "accepted_impostors": 98}, ...],        # loosest FAR first
     "best_accuracy": {"threshold": 0.37, "accuracy": 0.95},
     "provenance": {"source": "pairs.txt", "source_kind": "pairs" | "folder", "genuine_pairs": ...,
                    "impostor_pairs": ..., "images": ..., "skipped_images": ..., "identities": ...,
                    "seed": ..., "settings": {EmbedSettings.to_dict()}, "date": "2025-...Z",
                    "facefuse_version": "0.2.0", "fingerprint": "<model fingerprint>"}}

and is written into the model file itself (``export.runtime.write_thresholds``: ONNX metadata or
the checkpoint's model metadata), atomically. Records written before the settings object kept
``flip_tta`` / ``detect`` / ``center`` loose in the provenance; :class:`core.settings.EmbedSettings`
reads both.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import numpy as np

from facefuse.core.errors import FacefuseError, ParameterError
from facefuse.core.folders import scan_identity_folder
from facefuse.core.pairs import read_pairs
from facefuse.core.settings import EmbedSettings
from facefuse.verification.thresholds import RULE, check_fars, supported_fars, thresholds_from_scores

DEFAULT_IMPOSTORS = 1_000_000


# ---------------------------------------------------------------- pairs from identity labels


def identity_indices(folder: str | Path) -> tuple[list[Path], np.ndarray, list[str]]:
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


# ---------------------------------------------------------------- the command


def calibrate(source: str | Path, model: str | Path, embedder=None, settings: EmbedSettings = EmbedSettings(), *,
              fars=None, impostors: int = DEFAULT_IMPOSTORS, seed: int = 0, root: str | Path | None = None,
              progress: bool = False, write: bool = True) -> dict:
    """Calibrate ``model`` (``embedder``: the model already loaded) on ``source`` (a labelled pairs
    file, or a folder of identity sub-folders) under ``settings`` and, with ``write``, store the record
    in the model file. Returns the record. ``settings.align`` brings each face to the template first,
    as ``verify`` must then do too; ``settings.center`` scores embeddings centred on the mean of the
    source's images (``core.vectors.center_rows``), as ``verify`` does on its pairs. The record's
    provenance keeps the settings."""
    from facefuse.core.vectors import center_rows
    from facefuse.export.runtime import load_embedder, write_thresholds
    from facefuse.verification.scoring import embed_checked, pair_scores, score_pairs

    if fars:
        check_fars(fars)
    if impostors < 1:
        raise ParameterError("impostors", impostors, "must be at least 1")
    source = Path(source)
    embedder = embedder or load_embedder(model)
    if source.is_dir():
        paths, ids, names = identity_indices(source)
        ga, gb = genuine_pairs(ids)
        ia, ib = impostor_pairs(ids, impostors, seed)
        _check_counts(source, ga.size, ia.size, fars)
        emb, ok = embed_checked(embedder, paths, settings, progress=progress)
        if settings.center:
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
        scores, _, skipped = score_pairs(pairs, embedder, settings, progress=progress)
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
                             "impostor_pairs": int(impostor.size), "settings": settings.to_dict(),
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
        except ParameterError as exc:
            raise ParameterError(exc.param, exc.value, f"{source.name}: {exc.reason}") from None


def _version() -> str:
    import facefuse

    return facefuse.__version__
