"""Cross-dataset benchmark: one trained model on LFW fold k (identity-disjoint), ORL and Yale.

The model must have been trained without the identities of LFW fold ``--fold`` (the default
recipe's ``--val-pairs-fold K --val-pairs-disjoint``), or be marked ``--lfw-seen`` (a release model
trained on all of LFW: its LFW row is then training data, and only ORL and Yale are unseen). Every image of each set is embedded once
(``--flip``: flip test-time augmentation), then per set:

- **verification**: every genuine pair of the set and as many seeded random impostor pairs;
  10-way cross-validated accuracy (threshold fit on 9 parts, scored on the 10th), ROC AUC, EER,
  TAR at FAR 1e-2, and the FAR / TAR realised at the threshold calibrated at FAR ``--far`` on the
  LFW fold's identities (every genuine pair, up to ``--impostors`` impostor pairs:
  ``index.calibrate``). On the LFW row that threshold is scored on the pairs it was calibrated
  from (marked ``calibration set``); on ORL and Yale it is a transfer.
- **identification**, closed set: among the identities with two or more images, the first image
  (sorted path) is enrolled and every other is a query: rank-1 and rank-5 over all enrolled.
- **identification**, open set: those identities are split by sorted position, the even ones
  enrolled (first image), their other images the genuine probes, every image of the odd ones and
  of single-image identities an impostor probe; the detection-and-identification rate (rank-1
  correct and score >= t) at the threshold t where ``--far`` of the impostor probes are accepted.

Sets: ``lfw-fold<k>`` (every image of the fold's identities), ``orl`` (40 x 10 grey 92x112, not
template-aligned) and ``yale`` (15 people, 164 grey 320x243 uncropped images): resized to the
model's input as any image is, or with ``--detect haar`` first cropped to the template square
around the face the Haar detector finds (``core.facecrop``; LFW, aligned already, is not cropped).
``--center`` centres each set's embeddings on that set's own mean (no labels; ``verify --center``).
One JSON row per set, a table, and a ROC plot of the three sets.

    python benchmarks/cross_dataset.py --model runs/lfw --flip

Writes ``benchmarks/results/cross_dataset[-<tag>]-<device-slug>.json`` and ``plots/cross_dataset[-<tag>]-roc.png``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.calibration_transfer import fold_images, identity_pairs, scores_of  # noqa: E402
from benchmarks.common import RESULTS_DIR, device_name, print_table, write_results  # noqa: E402

COLUMNS = ["set", "identities", "images", "genuine", "accuracy", "auc", "eer", "tar_at_far_1e-2",
           "realised_far", "realised_tar", "rank1", "rank5", "dir_at_far"]


def parse_args(argv):
    from facefuse.core.paths import lfw_dir, shared_data_dir

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="run folder / checkpoint / .onnx trained disjoint from --fold")
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--pairs", default=str(lfw_dir() / "pairs.txt"))
    p.add_argument("--lfw", default=str(lfw_dir() / "lfw-112"))
    p.add_argument("--extra", nargs="*", default=[str(shared_data_dir() / "orl"), str(shared_data_dir() / "yale")],
                   help="other identity-folder sets (one sub-folder per identity)")
    p.add_argument("--far", type=float, default=1e-2, help="FAR of the LFW-calibrated threshold and of DIR")
    p.add_argument("--impostors", type=int, default=1_000_000, help="impostor pairs for the LFW calibration")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--flip", action="store_true")
    p.add_argument("--detect", "--align", dest="detect", default="none", choices=["none", "haar", "landmarks"],
                   help="bring each image of the --extra sets (not LFW, aligned already) to the template first: "
                        "haar crops around the Haar box (core.facecrop), landmarks aligns by five detected "
                        "landmarks (facefuse.align)")
    p.add_argument("--detect-lfw", action="store_true", help="with --detect: crop the LFW fold too (what the crop "
                   "does to faces that are aligned already)")
    p.add_argument("--center", action="store_true",
                   help="centre each set's embeddings on that set's own mean before scoring (core.vectors.center_rows, "
                        "as verify/calibrate --center do): the LFW threshold is then calibrated on centred LFW scores")
    p.add_argument("--lfw-seen", action="store_true",
                   help="the model trained on every LFW identity (a release run): the LFW row is then its training "
                        "data, marked so, and its threshold comes from seen faces")
    p.add_argument("--tag", default="", help="results name cross_dataset[-<tag>]-<device>.json (one per model)")
    p.add_argument("--plot", type=Path, default=None, help="default plots/cross_dataset[-<tag>]-roc.png")
    args = p.parse_args(argv)
    if args.plot is None:
        args.plot = RESULTS_DIR / "plots" / ("cross_dataset" + (f"-{args.tag}" if args.tag else "") + "-roc.png")
    return args


def run_name(model: Path) -> str:
    """A run's name without the machine's path: ``fold0-lever/shift`` for ``runs/lfw/fold0-lever/shift/train``."""
    parts = model.parts[:-1] if model.name == "train" else model.parts
    return "/".join(parts[-2:]) if len(parts) >= 2 and parts[-2].startswith("fold") else parts[-1]


def verification(emb, ids, seed):
    """Scores of every genuine pair and of as many seeded impostor pairs."""
    from facefuse.verification.calibrate import genuine_pairs, impostor_pairs

    genuine = genuine_pairs(ids)
    return scores_of(emb, (genuine, impostor_pairs(ids, genuine[0].size, seed)))


def identification(emb: np.ndarray, ids: np.ndarray, far: float) -> dict:
    """Closed-set rank-1/5 and open-set DIR at ``far`` (module docstring), by brute force."""
    from facefuse.core.metrics import threshold_at_far

    order = np.lexsort((np.arange(ids.size), ids))  # by identity, then by position (sorted paths)
    first = {}
    for k in order:
        first.setdefault(int(ids[k]), int(k))
    counts = np.bincount(ids)
    multi = np.array(sorted(i for i in first if counts[i] >= 2))
    out = {"enrolled": int(multi.size)}
    if multi.size < 2:
        return out
    gallery = np.array([first[i] for i in multi])
    is_first = np.zeros(ids.size, bool)
    is_first[gallery] = True
    queries = np.flatnonzero(np.isin(ids, multi) & ~is_first)
    sims = emb[queries] @ emb[gallery].T
    truth = np.searchsorted(multi, ids[queries])
    rank = (sims > sims[np.arange(queries.size), truth][:, None]).sum(1)  # 0 = correct at rank 1
    out.update(queries=int(queries.size), rank1=float(np.mean(rank == 0)), rank5=float(np.mean(rank < 5)))
    # open set: even-positioned multi-image identities enrolled, the rest are impostor probes
    enrolled = multi[::2]
    g_rows = np.array([first[i] for i in enrolled])
    gen = np.flatnonzero(np.isin(ids, enrolled) & ~np.isin(np.arange(ids.size), g_rows))
    imp = np.flatnonzero(~np.isin(ids, enrolled))
    s_gen, s_imp = emb[gen] @ emb[g_rows].T, emb[imp] @ emb[g_rows].T
    top_imp = s_imp.max(1)
    if far * imp.size < 1:  # not one impostor probe may be accepted: no threshold to speak of
        out.update(dir_at_far=None, open_set_impostor_probes=int(imp.size))
        return out
    t, _ = threshold_at_far(top_imp, far)  # the calibration rule: at most `far` of them >= t
    right = s_gen.argmax(1) == np.searchsorted(enrolled, ids[gen])
    out.update(dir_at_far=float(np.mean(right & (s_gen.max(1) >= t))), open_set_threshold=float(t),
               open_set_far=float(np.mean(top_imp >= t)), open_set_genuine_probes=int(gen.size),
               open_set_impostor_probes=int(imp.size))
    return out


def plot_rocs(curves: dict, path: Path) -> None:
    """One ROC per set (log FAR axis), as the project's other plots: a matplotlib ``Figure`` (no
    pyplot state) saved atomically."""
    from matplotlib.figure import Figure

    from facefuse.core.files import atomic_path
    from facefuse.core.metrics import roc_curve

    fig = Figure(figsize=(5, 4), dpi=120)
    ax = fig.subplots()
    for name, (g, i) in curves.items():
        fpr, tpr, _ = roc_curve(np.r_[g, i], np.r_[np.ones(g.size), np.zeros(i.size)])
        ax.plot(fpr, tpr, label=name)
    ax.set_xscale("log")
    ax.set_xlim(1e-3, 1)
    ax.set_xlabel("false accept rate")
    ax.set_ylabel("true accept rate")
    ax.grid(alpha=0.3)
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, bbox_inches="tight", format="png")


def main(argv=None):
    args = parse_args(argv)
    from facefuse.core.metrics import verification_metrics
    from facefuse.core.settings import EmbedSettings
    from facefuse.core.vectors import center_rows
    from facefuse.export.runtime import load_embedder
    from facefuse.verification.calibrate import identity_indices, thresholds_from_scores
    from facefuse.verification.scoring import embed_checked

    embedder = load_embedder(args.model)
    settings = EmbedSettings(flip=args.flip, batch_size=args.batch_size, workers=args.workers, align=args.detect)
    lfw_paths, lfw_ids, _ = fold_images(args.pairs, args.lfw, args.fold)
    sets = {f"lfw-fold{args.fold}": (lfw_paths, lfw_ids)}
    for folder in args.extra:
        paths, ids, _ = identity_indices(folder)
        sets[Path(folder).name] = (paths, ids)
    rows, curves, threshold = [], {}, None
    t0 = time.perf_counter()
    for name, (paths, ids) in sets.items():
        # LFW is aligned already: cropped on request
        used = settings if rows or args.detect_lfw else settings.replace(align="none")
        found = {} if used.align != "none" else None
        emb, _ = embed_checked(embedder, paths, used, found=found)
        if args.center:  # the set's own mean: no labels used
            emb = center_rows(emb, where=name)
        if threshold is None:  # the first set is the LFW fold: calibrate there
            g_cal, i_cal = scores_of(emb, identity_pairs(ids, args.impostors, args.seed))
            record = thresholds_from_scores(g_cal, i_cal, [args.far])
            threshold = np.float32(record["at_far"][0]["threshold"])
        g, i = verification(emb, ids, args.seed)
        curves[name] = (g, i)
        scores = np.r_[g, i]
        labels = np.r_[np.ones(g.size, np.int64), np.zeros(i.size, np.int64)]
        m = verification_metrics(scores, labels, folds=np.zeros(scores.size, np.int64))
        rows.append({"set": name, "identities": int(np.unique(ids).size), "images": len(paths), "genuine": int(g.size),
                     "impostors": int(i.size), "accuracy": m["kfold_accuracy"], "accuracy_std": m["kfold_std"],
                     "auc": m["roc_auc"], "eer": m["eer"], "tar_at_far_1e-2": m["tar_at_far_1e-2"],
                     "best_threshold": m["best_threshold"], "lfw_threshold": float(threshold),
                     "realised_far": float(np.mean(i >= threshold)), "realised_tar": float(np.mean(g >= threshold)),
                     "threshold_role": ("calibration set" + (", seen in training" if args.lfw_seen else "")
                                        if not rows else "transfer"),
                     "faces_found": None if found is None else sum(1 for n in found.values() if n > 0),
                     **identification(emb, ids, args.far)})
    print_table(rows, COLUMNS)
    plot_rocs(curves, args.plot)
    settings = {**{k: v for k, v in vars(args).items() if k not in ("model", "pairs", "lfw", "extra", "plot")},
                "model": run_name(Path(args.model)), "model_fingerprint": embedder.fingerprint,
                "runtime": embedder.runtime, "sets": list(sets), "plot": args.plot.name, "tag": args.tag,
                "seconds": time.perf_counter() - t0, "load_avg_1m": os.getloadavg()[0]}
    name = "cross_dataset" + (f"-{args.tag}" if args.tag else "")
    print(f"wrote {write_results(name, device_name('cpu'), settings, rows)} and {args.plot}")


if __name__ == "__main__":
    main()
