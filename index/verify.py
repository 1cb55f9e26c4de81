"""Batch verification of a pairs file: embed every distinct image once, score each pair by the
cosine of its two embeddings, and (with labels) compute the verification metrics."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facefuse.core import metrics
from facefuse.core.pairs import Pairs, read_pairs
from facefuse.core.errors import FacefuseError
from facefuse.core.files import atomic_path


@dataclass
class VerifyResult:
    pairs: Pairs
    scores: np.ndarray        # float32 cosine per pair, NaN where an image was skipped
    scored: np.ndarray        # bool per pair: both images embedded
    n_images: int             # distinct images in the file
    n_skipped_images: int
    metrics: dict | None      # core.metrics.verification_metrics over the scored pairs (labels only)
    threshold: float | None   # the decision threshold used for "same" in the CSV, if any

    def decisions(self) -> np.ndarray | None:
        """1 = same / 0 = different per pair (``score >= threshold``), or None without a threshold."""
        if self.threshold is None:
            return None
        return (self.scores >= self.threshold).astype(np.int8)


def verify_pairs(pairs_file: str | Path | Pairs, embedder, *, root: str | Path | None = None,
                 batch_size: int = 64, num_workers: int | None = None, flip_tta: bool = False,
                 skip_missing: bool = False, threshold: float | None = None) -> VerifyResult:
    """Score every pair in ``pairs_file`` (a path, or a :class:`Pairs` already read, in which
    case ``root`` is unused) with ``embedder`` (:class:`export.runtime.Embedder`).

    Without ``threshold`` but with labels, the CSV decision threshold is the best-accuracy one
    from the metrics. Pairs that lose an image under ``skip_missing`` get a NaN score and are left
    out of the metrics.
    """
    pairs = pairs_file if isinstance(pairs_file, Pairs) else read_pairs(pairs_file, root=root)
    uniq, ia, ib = pairs.unique_paths()
    where = {p: f"{pairs.source.name}:{n}" for p, n in pairs.first_lines().items()}
    emb, ok = embedder.embed_paths(uniq, batch_size=batch_size, num_workers=num_workers,
                                   flip_tta=flip_tta, skip_missing=skip_missing, where=where)
    scored = ok[ia] & ok[ib]
    scores = np.full(len(pairs), np.nan, dtype=np.float32)
    scores[scored] = np.sum(emb[ia[scored]] * emb[ib[scored]], axis=1)
    result_metrics = None
    if pairs.labels is not None:
        if not scored.any():
            raise FacefuseError(f"{pairs.source}: no pair left to score")
        folds = pairs.folds[scored] if pairs.folds is not None else None
        result_metrics = metrics.verification_metrics(scores[scored], pairs.labels[scored], folds)
        if threshold is None:
            threshold = result_metrics["best_threshold"]
        else:
            result_metrics["threshold"] = float(threshold)
            result_metrics["threshold_accuracy"] = metrics.accuracy(scores[scored], pairs.labels[scored],
                                                                    threshold)
    return VerifyResult(pairs, scores, scored, len(uniq), int((~ok).sum()), result_metrics, threshold)


def write_scores_csv(path: str | Path, result: VerifyResult) -> None:
    """``line,path_a,path_b,score[,label][,same]`` per pair, written atomically; skipped pairs have
    an empty score and decision."""
    p = result.pairs
    dec = result.decisions()
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["line", "path_a", "path_b", "score"] + (["label"] if p.labels is not None else [])
               + (["same"] if dec is not None else []))
    for k in range(len(p)):
        ok = result.scored[k]
        row = [int(p.lines[k]), str(p.paths_a[k]), str(p.paths_b[k]), f"{result.scores[k]:.6f}" if ok else ""]
        if p.labels is not None:
            row.append(int(p.labels[k]))
        if dec is not None:
            row.append(int(dec[k]) if ok else "")
        w.writerow(row)
    with atomic_path(path) as tmp:
        Path(tmp).write_text(buf.getvalue())


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
        raise FacefuseError("--plot needs a pairs file with labels")
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
