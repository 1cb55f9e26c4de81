"""The README's headline: README command 1 trained with several seeds, each model scored the same
way, reported as the mean and spread over the seeds.

Per model (a run folder of ``facefuse train``, trained without the identities of LFW fold 0):

- LFW fold 0, the official 600 pairs, flip TTA: accuracy with the threshold chosen by 10-way
  cross-validation inside the fold (the LFW protocol's rule) and ROC AUC, on the pre-aligned
  ``lfw-112`` crops and on the same photos as taken (``raw-fold0``) aligned by facefuse's landmarks;
- ORL and Yale (never seen in training): ROC AUC over every genuine pair and as many seeded impostor
  pairs, photos aligned by landmarks, not centred.

    for s in 0 1 2; do facefuse train ... --seed $s --out runs/lfw-seed$s; done   # README command 1
    python benchmarks/headline.py runs/lfw-seed0 runs/lfw-seed1 runs/lfw-seed2

Writes ``benchmarks/results/headline-<device>.json``: one row per model and one ``mean`` row with
each figure's mean and sample standard deviation over the models.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import device_name, print_table, write_results  # noqa: E402
from facefuse.core.paths import lfw_dir, shared_data_dir  # noqa: E402

FIGURES = ("lfw_acc", "lfw_auc", "raw_acc", "raw_auc", "orl_auc", "yale_auc")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="run folders (or model files) of README command 1, one per seed")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--seed", type=int, default=0, help="seed of the ORL / Yale impostor sample")
    return p.parse_args(argv)


def fold0_pairs(pairs_file: Path, out: Path) -> Path:
    """A copy of LFW's ``pairs.txt`` holding fold 0 only (its header says one fold)."""
    lines = pairs_file.read_text().splitlines()
    n_folds, per_side = (int(v) for v in lines[0].split())
    out.write_text("\n".join([f"1\t{per_side}", *lines[1:1 + 2 * per_side]]) + "\n")
    return out


def fold0(model, pairs_file: Path, root: Path) -> tuple[float, float]:
    """``(accuracy, AUC)`` on fold 0's 600 pairs (10-way CV inside the fold)."""
    from facefuse.core.metrics import verification_metrics
    from facefuse.core.pairs import read_pairs
    from facefuse.verification.scoring import score_pairs

    pairs = read_pairs(pairs_file, root=root)
    scores, _, _ = score_pairs(pairs, model.embedder, model.settings)
    m = verification_metrics(scores, pairs.labels, folds=np.zeros(len(pairs), np.int64))
    return m["kfold_accuracy"], m["roc_auc"]


def other_set(model, folder: Path, seed: int) -> float:
    """ROC AUC over every genuine pair and as many impostor pairs of ``folder``'s identities."""
    from benchmarks.cross_dataset import verification
    from facefuse.core.metrics import verification_metrics
    from facefuse.verification.calibrate import identity_indices

    paths, ids, _ = identity_indices(folder)
    emb = model.embed(paths)
    g, i = verification(emb, ids, seed)
    y = np.r_[np.ones(g.size, np.int64), np.zeros(i.size, np.int64)]
    return verification_metrics(np.r_[g, i], y, folds=np.zeros(y.size, np.int64))["roc_auc"]


def score(run: Path, workers, seed: int) -> dict:
    import facefuse

    lfw, data = lfw_dir(), shared_data_dir()
    aligned = facefuse.load_model(run, flip=True, workers=workers)
    photos = aligned.with_settings(align="landmarks")
    t0 = time.perf_counter()
    row = {"run": run.name}
    with tempfile.TemporaryDirectory() as tmp:
        pairs = fold0_pairs(lfw / "pairs.txt", Path(tmp) / "pairs-fold0.txt")
        row["lfw_acc"], row["lfw_auc"] = fold0(aligned, pairs, lfw / "lfw-112")
        row["raw_acc"], row["raw_auc"] = fold0(photos, pairs, lfw / "raw-fold0")
    row["orl_auc"] = other_set(photos, data / "orl", seed)
    row["yale_auc"] = other_set(photos, data / "yale", seed)
    row["seconds"] = time.perf_counter() - t0
    return row


def summary(rows: list[dict]) -> dict:
    out = {"run": f"mean of {len(rows)}"}
    for f in FIGURES:
        v = np.array([r[f] for r in rows], np.float64)
        out[f], out[f + "_std"] = float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0
    return out


def main(argv=None):
    args = parse_args(argv)
    load = os.getloadavg()[0]
    rows = [score(r, args.workers, args.seed) for r in args.runs]
    rows.append(summary(rows))
    print_table(rows, ["run", *FIGURES])
    settings = {"runs": [r.name for r in args.runs], "flip": True, "lfw": "fold 0, official 600 pairs",
                "raw_align": "landmarks", "other_align": "landmarks", "center": False, "seed": args.seed,
                "load_avg_1m": [round(load, 2), round(os.getloadavg()[0], 2)]}
    print(f"wrote {write_results('headline', device_name('cpu'), settings, rows)}")


if __name__ == "__main__":
    main()
