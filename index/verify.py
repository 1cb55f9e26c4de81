"""Batch verification of a pairs file: embed every distinct image once, score each pair by the
cosine of its two embeddings, decide ``same`` at a threshold (given, or calibrated and stored in
the model: :mod:`index.calibrate`) and, with labels, compute the verification metrics.

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
    threshold_source: str | None = None  # where it came from ("--threshold", "calibrated FAR 1e-03", ...)
    rates: dict | None = None  # core.metrics.rates_at_threshold at `threshold` (labels only)
    note: str | None = None   # why ROC metrics are absent, when labels are one class only
    seconds: float = 0.0      # embedding + scoring time

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


def embed_images(embedder, images, *, batch_size: int = 64, num_workers: int | None = None,
                 flip_tta: bool = False, skip_missing: bool = False, where: dict | None = None,
                 progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``embedder.embed_paths`` with a progress bar on stderr (tqdm; shown on a terminal only) and
    the non-finite check."""
    from tqdm import tqdm

    with tqdm(total=len(images), unit="img", desc="embedding", leave=False,
              disable=None if progress else True) as bar:
        emb, ok = embedder.embed_paths(images, batch_size=batch_size, num_workers=num_workers, flip_tta=flip_tta,
                                       skip_missing=skip_missing, where=where, progress=bar.update)
    check_finite(emb, ok, images, where)
    return emb, ok


def score_pairs(pairs: Pairs, embedder, center: bool = False, **embed_kw) -> tuple[np.ndarray, np.ndarray, int]:
    """``(scores, scored, skipped images)`` for every pair: each distinct image embedded once
    (``center``: then centred on the mean of them all, ``core.vectors.center_rows``)."""
    from facefuse.core.vectors import center_rows

    where = {p: f"{pairs.source.name}:{n}" for p, n in pairs.first_lines().items()}
    emb, ok = embed_images(embedder, pairs.images, where=where, **embed_kw)
    if center:
        emb = center_rows(emb, ok, where=pairs.source.name)
    scores = pair_scores(emb, pairs.ia, pairs.ib, ok)
    return scores, ~np.isnan(scores), int((~ok).sum())


def resolve_threshold(meta, threshold: float | None, far: float | None, where: str):
    """``(threshold, source)``: ``--threshold`` if given, else the model's calibrated threshold at
    ``far`` (default: :func:`index.calibrate.stored_threshold`'s choice), else ``(None, None)``."""
    from facefuse.index.calibrate import stored_threshold

    if threshold is not None and far is not None:
        raise FacefuseError("give --threshold or --far, not both")
    if threshold is not None:
        if not np.isfinite(threshold):
            raise FacefuseError(f"--threshold {threshold}: must be a finite number")
        return float(threshold), "--threshold"
    return stored_threshold(meta, far, where)


def test_time_settings(flip_tta: bool, crop, center: bool = False) -> dict:
    """The embedding settings a calibrated threshold depends on, as stored in its provenance."""
    from facefuse.core.facecrop import detect_name

    return {"flip_tta": bool(flip_tta), "detect": detect_name(crop), "center": bool(center)}


def describe_settings(s: dict) -> str:
    """``flip off, detect haar[, centred]`` for a :func:`test_time_settings` record."""
    return f"flip {'on' if s['flip_tta'] else 'off'}, detect {s['detect']}" + (", centred" if s["center"] else "")


def calibration_mismatch(embedder, flip_tta: bool, center: bool = False) -> str | None:
    """Why the model's stored threshold may not hold for this run (it was calibrated with other
    ``--flip`` / ``--detect`` / ``--center`` settings), or None. Records without the setting count
    as its default."""
    prov = ((getattr(embedder.meta, "thresholds", None) or {}).get("provenance") or {})
    now = test_time_settings(flip_tta, getattr(embedder, "crop", None), center)
    was = {k: prov.get(k, default) for k, default in test_time_settings(False, None).items()}
    if was == now:
        return None
    return (f"the stored threshold was calibrated with {describe_settings(was)} and this run uses "
            f"{describe_settings(now)}: "
            "its FAR may not hold (calibrate again with these options)")


def verify_pairs(pairs_file: str | Path | Pairs, embedder, *, root: str | Path | None = None,
                 batch_size: int = 64, num_workers: int | None = None, flip_tta: bool = False,
                 skip_missing: bool = False, threshold: float | None = None, far: float | None = None,
                 progress: bool = False, model_name: str = "the model", center: bool = False) -> VerifyResult:
    """Score every pair in ``pairs_file`` (a path, or a :class:`Pairs` already read, in which
    case ``root`` is unused) with ``embedder`` (:class:`export.runtime.Embedder`).

    The decision threshold is ``threshold``, else the model's calibrated one (at ``far``), else,
    with labels of both classes, the best-accuracy one from the metrics. Pairs that lose an image
    under ``skip_missing`` get a NaN score and are left out of the metrics. Labels of one class only
    (all same-person or all different-person) still give the rate that class allows (TAR or FAR) at
    the threshold; ``note`` says why the ROC metrics are absent. ``center`` scores the pairs'
    embeddings centred on the mean of all their distinct images (``core.vectors.center_rows``): a
    threshold calibrated so (``calibrate --center``) then holds on sets unlike the calibration set.
    """
    t, source = resolve_threshold(embedder.meta, threshold, far, model_name)
    mismatch = calibration_mismatch(embedder, flip_tta, center) if threshold is None and t is not None else None
    pairs = pairs_file if isinstance(pairs_file, Pairs) else read_pairs(pairs_file, root=root)
    t0 = time.perf_counter()
    scores, scored, skipped = score_pairs(pairs, embedder, batch_size=batch_size, num_workers=num_workers,
                                          flip_tta=flip_tta, skip_missing=skip_missing, progress=progress,
                                          center=center)
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
                                            f"give --threshold or calibrate the model to get the {rate}"))
        else:
            result_metrics = metrics.verification_metrics(s, y, folds)
            if t is None:
                t, source = result_metrics["best_threshold"], "best accuracy on these pairs"
        if t is not None:
            rates = metrics.rates_at_threshold(s, y, t)
    if mismatch:
        note = f"{note}; {mismatch}" if note else mismatch
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


def check_plot_path(path: str | Path) -> None:
    """Refuse an output format matplotlib cannot write before any work is done."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fmt = Path(path).suffix.lstrip(".").lower()
    supported = FigureCanvasAgg(Figure()).get_supported_filetypes()
    if fmt not in supported:
        raise FacefuseError(f"--plot {path}: unsupported image format {fmt!r}; valid: {', '.join(sorted(supported))}")


def plot_roc(path: str | Path, result: VerifyResult, title: str | None = None) -> None:
    """Draw the ROC (TAR vs FAR, log FAR axis) to an image file, atomically (Agg, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if result.metrics is None:
        raise FacefuseError("--plot needs labelled pairs of both kinds (same and different); "
                            + (result.note or "this file has no labels"))
    s, y = result.scores[result.scored], result.pairs.labels[result.scored]
    far, tar, _ = metrics.roc_curve(s, y)
    fig = Figure(figsize=(5, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    m = result.metrics
    ax.plot(np.maximum(far, 1e-5), tar, lw=1.5,
            label=f"AUC {m['roc_auc']:.4f}, EER {m['eer']:.4f}")
    ax.set_xscale("log")
    ax.set_xlim(1e-4 if len(s) > 2000 else 1e-3, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false accept rate")
    ax.set_ylabel("true accept rate")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title(title or f"ROC: {result.pairs.source.name} ({int(result.scored.sum())} pairs)")
    check_plot_path(path)
    fmt = Path(path).suffix.lstrip(".").lower()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt)
