"""Tables and plots of the LFW protocol results, from the committed JSON alone.

Reads ``benchmarks/results/lfw_protocol-<device>.json`` (rows written by ``lfw_protocol.py``) and its
sidecar ``lfw_protocol-<device>.scores.json`` (each row's 600 flip scores and pair labels), and
writes (atomically), for the rows of each table (a name prefix such as ``loss/``):

- ``<out>/<table>-curves.png``: training loss, training accuracy and held-out closed-set accuracy
  against training minutes;
- ``<out>/<table>-roc.png``: the fold's ROC (flip TTA) of every row, best first;
- a Markdown table on stdout (and ``--markdown FILE``), best ROC AUC first (AUC uses all 600 scores,
  so it is less noisy than the thresholded accuracy).

    python benchmarks/lfw_report.py --table loss backbone regulariser recipe
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS_DIR, read_sidecar  # noqa: E402
from facefuse.core.metrics import roc_curve  # noqa: E402
from facefuse.core.files import atomic_path, atomic_write_text  # noqa: E402

COLUMNS = [  # (header, key, format)
    ("row", "name", "{}"),
    ("params", "parameters", "{:,}"),
    ("img/s", "images_per_s", "{:.0f}"),
    ("epochs", "epochs_done", "{}"),
    ("train acc", "last_train_accuracy", "{:.3f}"),
    ("closed-set acc", "val_accuracy", "{:.3f}"),
    ("LFW acc", "plain_kfold_accuracy", "{:.1%}"),
    ("LFW acc, flip", "flip_kfold_accuracy", "{:.1%}"),
    ("± std", "flip_kfold_std", "{:.1%}"),
    ("AUC", "flip_roc_auc", "{:.4f}"),
    ("EER", "flip_eer", "{:.3f}"),
    ("TAR@FAR=1e-2", "flip_tar_at_far_1e-2", "{:.3f}"),
]


def reference_rows(table: str, names: list[str]) -> dict[str, str]:
    """Rows of another table that a table compares against: the backbone table's ResNet-18 row is
    the loss table's ArcFace row, and the regulariser table's baseline is its base loss row."""
    if table == "backbone":
        return {"loss/arcface": "backbone/resnet18-x0.25"}
    if table == "regulariser":
        bases = {n.split("/", 1)[1].split("+", 1)[0] for n in names if n.startswith("regulariser/")}
        return {f"loss/{b}": f"regulariser/{b} (none)" for b in bases}
    return {}


def load_rows(path: Path, table: str, fold: int) -> list[dict]:
    doc = json.loads(path.read_text())
    scores = read_sidecar(path)  # flip_scores and pair_labels of each row, for the ROC
    results = [{**r, **scores.get(r["name"], {})} for r in doc["results"] if r["fold"] == fold]
    rows = [r for r in results if r["name"].startswith(f"{table}/")]
    refs = reference_rows(table, [r["name"] for r in rows])
    budgets = {r.get("budget_minutes") for r in rows}
    rows += [{**r, "name": refs[r["name"]]} for r in results
             if r["name"] in refs and r.get("budget_minutes") in budgets]
    for r in rows:
        hist = r.get("history") or []
        r["last_train_accuracy"] = hist[-1].get("train_accuracy") if hist else None
    return sorted(rows, key=lambda r: (-r["flip_roc_auc"], r["name"]))


def markdown(rows: list[dict]) -> str:
    out = ["| " + " | ".join(h for h, _, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = []
        for _, key, fmt in COLUMNS:
            v = r.get(key)
            cells.append("-" if v is None else fmt.format(v.split("/", 1)[1] if key == "name" else v))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def _colour(i: int) -> str:
    from matplotlib import colormaps

    return colormaps["tab10" if i < 10 else "tab20"](i % 20)


def _save(fig, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def plot_curves(rows: list[dict], path: Path, title: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 4), dpi=110)
    axes = fig.subplots(1, 3)
    for i, r in enumerate(rows):
        hist = r.get("history") or []
        t = [h["elapsed_s"] / 60 for h in hist]
        label = r["name"].split("/", 1)[1]
        for ax, key in zip(axes, ("train_loss", "train_accuracy", "val_accuracy")):
            pts = [(x, h[key]) for x, h in zip(t, hist) if h.get(key) is not None]
            if pts:  # one colour per row in every panel (pair-only losses have no accuracy)
                ax.plot(*zip(*pts), marker=".", lw=1.2, color=_colour(i), label=label)
    for ax, name in zip(axes, ("training loss", "training accuracy (top-1)", "held-out closed-set accuracy")):
        ax.set_xlabel("training minutes")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=7, loc="upper right")
    fig.suptitle(title)
    _save(fig, path)


def plot_roc(rows: list[dict], path: Path, title: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 5), dpi=110)
    ax = fig.subplots()
    for i, r in enumerate(rows):
        if not r.get("flip_scores"):
            continue
        far, tar, _ = roc_curve(np.asarray(r["flip_scores"]), np.asarray(r["pair_labels"], dtype=bool))
        ax.plot(far, tar, lw=1.3, color=_colour(i), label=f"{r['name'].split('/', 1)[1]}  AUC {r['flip_roc_auc']:.3f}")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
    ax.set_xlabel("false accept rate")
    ax.set_ylabel("true accept rate")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(title)
    _save(fig, path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, default=RESULTS_DIR / "lfw_protocol-cpu2.json")
    ap.add_argument("--table", nargs="+", default=["loss", "backbone", "regulariser", "recipe"])
    ap.add_argument("--fold", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "plots", help="folder for the PNG files")
    ap.add_argument("--markdown", type=Path, default=None, help="also write the tables to this file")
    args = ap.parse_args(argv)
    if not args.results.is_file():
        sys.exit(f"error: --results {args.results}: no such file (run benchmarks/lfw_suite.py first)")
    args.out.mkdir(parents=True, exist_ok=True)
    text = []
    for table in args.table:
        rows = load_rows(args.results, table, args.fold)
        if not rows:
            print(f"{table}: no rows for fold {args.fold} in {args.results}", file=sys.stderr)
            continue
        budgets = sorted({r.get("budget_minutes") for r in rows if r.get("budget_minutes")})
        title = f"LFW fold {args.fold}, {table} table ({'/'.join(f'{b:g}' for b in budgets)} min, {rows[0]['device']})"
        plot_curves(rows, args.out / f"{table}-curves.png", title)
        plot_roc(rows, args.out / f"{table}-roc.png", title)
        text.append(f"### {table}\n\n{markdown(rows)}\n")
        print(f"wrote {args.out / f'{table}-curves.png'} and {args.out / f'{table}-roc.png'}", file=sys.stderr)
    print("\n".join(text))
    if args.markdown:
        atomic_write_text(args.markdown, "\n".join(text))


if __name__ == "__main__":
    main()
