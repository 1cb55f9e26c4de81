"""The ROC curve of a verification run, drawn to an image file (Agg, no pyplot state)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from facefuse.core import metrics
from facefuse.core.errors import ParameterError
from facefuse.core.files import atomic_path


def check_plot_path(path: str | Path) -> None:
    """Refuse an output format matplotlib cannot write before any work is done."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fmt = Path(path).suffix.lstrip(".").lower()
    supported = FigureCanvasAgg(Figure()).get_supported_filetypes()
    if fmt not in supported:
        raise ParameterError("plot", path, f"unsupported image format {fmt!r}; valid: {', '.join(sorted(supported))}")


def plot_roc(path: str | Path, result: VerifyResult, title: str | None = None) -> None:
    """Draw the ROC (TAR vs FAR, log FAR axis) to an image file, atomically (Agg, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if result.metrics is None:
        raise ParameterError("plot", path, "needs labelled pairs of both kinds (same and different); "
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
