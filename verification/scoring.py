"""Batch verification of a pairs file: embed every distinct image once, score each pair by the
cosine of its two embeddings, decide ``same`` at a threshold (given, or calibrated and stored in
the model: :mod:`verification.calibrate`) and, with labels, compute the verification metrics.

Memory is proportional to the distinct images, not the pairs: pairs are numpy index arrays
(:class:`core.pairs.Pairs`), scores are computed in chunks, and the CSV is streamed out in chunks.
"""

from __future__ import annotations

import csv
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facefuse.core import metrics
from facefuse.core.pairs import Pairs, read_pairs
from facefuse.core.errors import FacefuseError
from facefuse.core.files import atomic_path
from facefuse.core.settings import EmbedSettings
from facefuse.verification.thresholds import calibration_mismatch, resolve_threshold

CHUNK = 1 << 16  # pairs scored / written per step


@dataclass
class VerifyResult:
    pairs: Pairs
    scores: np.ndarray        # float32 cosine per pair, NaN where an image was skipped
    scored: np.ndarray        # bool per pair: both images embedded
    n_images: int             # distinct images in the file
    n_skipped_images: int
    metrics: dict | None      # core.metrics.verification_metrics over the scored pairs (both classes only)
    threshold: float | None   # the decision threshold used for "same" in the CSV, if any
    threshold_source: str | None = None  # where it came from ("threshold given", "calibrated at FAR 0.001 on ...")
    rates: dict | None = None  # core.metrics.rates_at_threshold at `threshold` (labels only)
    note: str | None = None   # why ROC metrics are absent, when labels are one class only
    seconds: float = 0.0      # embedding + scoring time

    def summary(self) -> dict:
        """What ``facefuse verify`` prints: counts, the metrics, the threshold with its decisions and
        rates, any note, and the speed."""
        scored = int(self.scored.sum())
        out = {"pairs": len(self.pairs), "scored_pairs": scored, "images": self.n_images,
               "skipped_images": self.n_skipped_images, "format": self.pairs.format, **(self.metrics or {})}
        if self.threshold is not None:
            dec = self.decisions()[self.scored]
            out.update(threshold=self.threshold, threshold_source=self.threshold_source, same=int(dec.sum()),
                       different=int((1 - dec).sum()))
        if self.rates is not None:
            out.update(threshold_tar=self.rates["tar"], threshold_far=self.rates["far"],
                       threshold_accuracy=self.rates["accuracy"])
        if self.note:
            out["note"] = self.note
        out.update(seconds=self.seconds, pairs_per_s=scored / self.seconds if self.seconds > 0 else None)
        return out

    def decisions(self) -> np.ndarray | None:
        """1 = same / 0 = different per pair (``score >= threshold``), or None without a threshold."""
        if self.threshold is None:
            return None
        return (self.scores >= np.float32(self.threshold)).astype(np.int8)


def pair_scores(emb: np.ndarray, ia: np.ndarray, ib: np.ndarray, ok: np.ndarray | None = None) -> np.ndarray:
    """float32 cosine ``emb[ia[k]] . emb[ib[k]]`` per pair (rows L2-normalised), computed in chunks
    so no pairs x dim array is ever built; NaN where ``ok`` (per row of ``emb``) is false."""
    scores = np.full(ia.size, np.nan, dtype=np.float32)
    for lo in range(0, ia.size, CHUNK):
        a, b = ia[lo:lo + CHUNK], ib[lo:lo + CHUNK]
        scores[lo:lo + CHUNK] = np.einsum("ij,ij->i", emb[a], emb[b])
    if ok is not None:
        scores[~(ok[ia] & ok[ib])] = np.nan
    return scores


def check_finite(emb: np.ndarray, ok: np.ndarray, images, where: dict | None = None) -> None:
    """A model that gives NaN/inf for an image is an error naming the image (not a NaN score)."""
    bad = np.flatnonzero(ok & ~np.isfinite(emb).all(axis=1))
    if bad.size:
        p = images[bad[0]]
        at = f" ({where[p]})" if where and p in where else ""
        raise FacefuseError(f"{p}{at}: the model gave a non-finite embedding"
                            + (f" (and {bad.size - 1} more images)" if bad.size > 1 else ""))


def embed_checked(embedder, images, settings: EmbedSettings = EmbedSettings(), *, where: dict | None = None,
                  progress: bool = False, found: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``embedder.embed_paths`` with a progress bar on stderr (tqdm; shown on a terminal only) and
    the non-finite check (``found``: faces seen per image, as ``embed_paths`` fills it)."""
    from tqdm import tqdm

    with tqdm(total=len(images), unit="img", desc="embedding", leave=False,
              disable=None if progress else True) as bar:
        emb, ok = embedder.embed_paths(images, settings, where=where, progress=bar.update, found=found)
    check_finite(emb, ok, images, where)
    return emb, ok


def faces_note(found: dict, n_images: int) -> str | None:
    """``"2 of 807 images had no face found (used whole), 114 several (the largest used)"``, or None."""
    none = sum(1 for n in found.values() if n == 0)
    several = sum(1 for n in found.values() if n > 1)
    if not (none or several):
        return None
    return (f"{none} of {n_images} images had no face found (used whole), {several} had several faces "
            "(the largest used)")


def score_pairs(pairs: Pairs, embedder, settings: EmbedSettings = EmbedSettings(),
                progress: bool = False, found: dict | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """``(scores, scored, skipped images)`` for every pair: each distinct image embedded once
    (``settings.center``: then centred on the mean of them all, ``core.vectors.center_rows``)."""
    from facefuse.core.vectors import center_rows

    where = {p: f"{pairs.source.name}:{n}" for p, n in pairs.first_lines().items()}
    emb, ok = embed_checked(embedder, pairs.images, settings, where=where, progress=progress, found=found)
    if settings.center:
        emb = center_rows(emb, ok, where=pairs.source.name)
    scores = pair_scores(emb, pairs.ia, pairs.ib, ok)
    return scores, ~np.isnan(scores), int((~ok).sum())


def verify_pairs(pairs_file: str | Path | Pairs, embedder, settings: EmbedSettings = EmbedSettings(), *,
                 root: str | Path | None = None, threshold: float | None = None, far: float | None = None,
                 progress: bool = False, model_name: str = "the model") -> VerifyResult:
    """Score every pair in ``pairs_file`` (a path, or a :class:`Pairs` already read, in which
    case ``root`` is unused) with ``embedder`` (:class:`export.runtime.Embedder`) under ``settings``.

    The decision threshold is ``threshold``, else the model's calibrated one (at ``far``), else,
    with labels of both classes, the best-accuracy one from the metrics. Pairs that lose an image
    under ``settings.skip_missing`` get a NaN score and are left out of the metrics. Labels of one
    class only (all same-person or all different-person) still give the rate that class allows (TAR
    or FAR) at the threshold; ``note`` says why the ROC metrics are absent. ``settings.center`` scores
    the pairs' embeddings centred on the mean of all their distinct images (``core.vectors.center_rows``):
    a threshold calibrated so then holds on sets unlike the calibration set. A stored threshold
    calibrated under other settings is noted (``note``).
    """
    t, source = resolve_threshold(embedder.meta, threshold, far, model_name)
    mismatch = calibration_mismatch(embedder.meta, settings) if threshold is None and t is not None else None
    pairs = pairs_file if isinstance(pairs_file, Pairs) else read_pairs(pairs_file, root=root)
    t0 = time.perf_counter()
    found = {} if settings.align != "none" else None
    scores, scored, skipped = score_pairs(pairs, embedder, settings, progress=progress, found=found)
    seconds = time.perf_counter() - t0
    result_metrics = rates = note = None
    if pairs.labels is not None:
        if not scored.any():
            raise FacefuseError(f"{pairs.source}: no pair left to score")
        s, y = scores[scored], pairs.labels[scored]
        folds = pairs.folds[scored] if pairs.folds is not None else None
        if y.all() or not y.any():
            kind, rate = ("same-person", "TAR") if y.all() else ("different-person", "FAR")
            note = (f"all {y.size} scored pairs are {kind}: ROC metrics (AUC, EER, TAR at FAR, best threshold) "
                    f"need both kinds; " + (f"only the {rate} at the threshold is reported" if t is not None else
                                            f"give threshold= or calibrate the model to get the {rate}"))
        else:
            result_metrics = metrics.verification_metrics(s, y, folds)
            if t is None:
                t, source = result_metrics["best_threshold"], "best accuracy on these pairs"
        if t is not None:
            rates = metrics.rates_at_threshold(s, y, t)
    notes = [n for n in (note, mismatch, faces_note(found or {}, len(pairs.images))) if n]
    note = "; ".join(notes) or None
    return VerifyResult(pairs, scores, scored, len(pairs.images), skipped, result_metrics, t, source, rates,
                        note, seconds)


def write_scores_csv(path: str | Path, result: VerifyResult, progress: bool = False) -> None:
    """``line,path_a,path_b,score[,label][,same]`` per pair, streamed out in chunks into a temp
    file that replaces ``path`` at the end; skipped pairs have an empty score and decision."""
    from tqdm import tqdm

    p = result.pairs
    dec = result.decisions()
    names = [str(q) for q in p.images]
    header = ["line", "path_a", "path_b", "score"] + (["label"] if p.labels is not None else []) \
        + (["same"] if dec is not None else [])
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f, \
            tqdm(total=len(p), unit="pair", desc="writing", leave=False, disable=None if progress else True) as bar:
        w = csv.writer(f)
        w.writerow(header)
        for lo in range(0, len(p), CHUNK):
            sl = slice(lo, lo + CHUNK)
            ok = result.scored[sl].tolist()
            cols = [p.lines[sl].tolist(), [names[i] for i in p.ia[sl].tolist()],
                    [names[i] for i in p.ib[sl].tolist()],
                    [f"{x:.6f}" if k else "" for x, k in zip(result.scores[sl].tolist(), ok)]]
            if p.labels is not None:
                cols.append(p.labels[sl].tolist())
            if dec is not None:
                cols.append([d if k else "" for d, k in zip(dec[sl].tolist(), ok)])
            w.writerows(zip(*cols))
            bar.update(len(ok))
