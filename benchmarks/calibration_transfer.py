"""How a calibrated threshold transfers to identities it was not calibrated on.

The model must have been trained identity-disjoint from LFW fold ``--fold`` (``lfw_protocol.py``,
or ``train --val-pairs-disjoint`` on that fold), so none of the fold's identities (435 for fold 0)
was seen in training. Every image of those identities is embedded once; then

- ``half A -> half B`` (and ``B -> A``): the identities are split in two halves by ``--seed``;
  thresholds are calibrated on one half (every genuine pair, up to ``--impostors`` sampled impostor
  pairs: ``index.calibrate``) and the FAR and TAR they actually give are measured on the other half's
  pairs, formed the same way (disjoint identities);
- ``fold -> official pairs``: calibrated on all the fold's identities, measured on the fold's 600
  official pairs (300 impostors: a FAR below ~1e-2 is coarse there, reported with its counts).

    python benchmarks/calibration_transfer.py --model runs/fold0-disjoint            # run folder or .onnx

Writes ``benchmarks/results/calibration-<device-slug>.json`` through ``benchmarks/common.py``.
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

from benchmarks.common import device_name, print_table, write_results  # noqa: E402

COLUMNS = ["calibrated_on", "measured_on", "far", "threshold", "cal_tar", "realised_far", "realised_tar",
           "impostors", "accepted", "genuine"]


def parse_args(argv):
    from facefuse.core.paths import lfw_dir

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="run folder / checkpoint / .onnx trained disjoint from --fold")
    p.add_argument("--pairs", default=str(lfw_dir() / "pairs.txt"))
    p.add_argument("--root", default=str(lfw_dir() / "lfw-112"))
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--far", type=float, nargs="+", default=None, help="default: index.calibrate.DEFAULT_FARS")
    p.add_argument("--impostors", type=int, default=1_000_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--flip", action="store_true")
    return p.parse_args(argv)


def identity_pairs(ids: np.ndarray, impostors: int, seed: int):
    """All genuine pairs and up to ``impostors`` sampled impostor pairs of images labelled ``ids``."""
    from facefuse.verification.calibrate import genuine_pairs, impostor_pairs

    return genuine_pairs(ids), impostor_pairs(ids, impostors, seed)


def scores_of(emb: np.ndarray, pairs) -> tuple[np.ndarray, np.ndarray]:
    from facefuse.verification.scoring import pair_scores

    (ga, gb), (ia, ib) = pairs
    return pair_scores(emb, ga, gb), pair_scores(emb, ia, ib)


def measure(record: dict, genuine: np.ndarray, impostor: np.ndarray, calibrated_on: str, measured_on: str):
    """One row per stored FAR: the threshold's realised FAR / TAR on other genuine and impostor scores."""
    rows = []
    for e in record["at_far"]:
        t = np.float32(e["threshold"])
        accepted = int(np.count_nonzero(impostor >= t))
        rows.append({"calibrated_on": calibrated_on, "measured_on": measured_on, "far": e["far"],
                     "threshold": e["threshold"], "cal_tar": e["tar"], "cal_realised_far": e["realised_far"],
                     "realised_far": accepted / impostor.size if impostor.size else None,
                     "realised_tar": float(np.mean(genuine >= t)) if genuine.size else None,
                     "impostors": int(impostor.size), "accepted": accepted, "genuine": int(genuine.size)})
    return rows


def transfer(emb: np.ndarray, ids: np.ndarray, *, fars=None, impostors: int = 1_000_000, seed: int = 0,
             official=None) -> tuple[list[dict], dict]:
    """Rows of realised rates (see the module docstring) from embeddings ``emb`` (unit rows) labelled
    by identity ``ids``; ``official`` is ``(ia, ib, labels)`` of official pairs over the same rows.
    Also returns the pair counts of each calibration set."""
    from facefuse.verification.thresholds import thresholds_from_scores

    names = np.unique(ids)
    perm = np.random.default_rng(seed).permutation(names)
    halves = {"half A": np.isin(ids, perm[: names.size // 2]), "half B": np.isin(ids, perm[names.size // 2:])}
    sets = {}
    for name, keep in halves.items():
        rows_idx = np.flatnonzero(keep)
        g, i = scores_of(emb[rows_idx], identity_pairs(ids[rows_idx], impostors, seed))
        sets[name] = (g, i, thresholds_from_scores(g, i, fars))
    rows = measure(sets["half A"][2], *sets["half B"][:2], "half A", "half B")
    rows += measure(sets["half B"][2], *sets["half A"][:2], "half B", "half A")
    counts = {k: {"identities": int(np.unique(ids[m]).size), "images": int(m.sum()), "genuine": int(sets[k][0].size),
                  "impostors": int(sets[k][1].size)} for k, m in halves.items()}
    if official is not None:
        g, i = scores_of(emb, identity_pairs(ids, impostors, seed))
        record = thresholds_from_scores(g, i, fars)
        ia, ib, labels = official
        s = np.sum(emb[ia] * emb[ib], axis=1)
        y = np.asarray(labels).astype(bool)
        rows += measure(record, s[y], s[~y], "fold identities", "official fold pairs")
        counts["fold identities"] = {"identities": int(names.size), "images": int(ids.size),
                                     "genuine": int(g.size), "impostors": int(i.size)}
    return rows, counts


def fold_images(pairs_file: str, root: str, fold: int):
    """Every image of the fold's identities, their identity index, and the fold's official pairs
    as ``(ia, ib, labels)`` into that image list."""
    from facefuse.core.images import is_image
    from facefuse.core.pairs import read_pairs

    pairs = read_pairs(pairs_file, root=root)
    keep = pairs.folds == fold
    names = sorted({pairs.images[i].parent.name for i in np.r_[pairs.ia[keep], pairs.ib[keep]]})
    paths, ids = [], []
    for k, n in enumerate(names):
        found = sorted(p for p in (Path(root) / n).iterdir() if is_image(p))
        paths += found
        ids += [k] * len(found)
    where = {p: i for i, p in enumerate(paths)}
    ia = np.array([where[pairs.images[i]] for i in pairs.ia[keep]])
    ib = np.array([where[pairs.images[i]] for i in pairs.ib[keep]])
    return paths, np.array(ids), (ia, ib, pairs.labels[keep])


def main(argv=None):
    args = parse_args(argv)
    from facefuse.export.runtime import load_embedder
    from facefuse.core.settings import EmbedSettings
    from facefuse.verification.scoring import embed_checked

    embedder = load_embedder(args.model)
    paths, ids, official = fold_images(args.pairs, args.root, args.fold)
    t0 = time.perf_counter()
    settings = EmbedSettings(flip=args.flip, batch_size=args.batch_size, workers=args.workers)
    emb, _ = embed_checked(embedder, paths, settings, progress=True)
    embed_s = time.perf_counter() - t0
    rows, counts = transfer(emb, ids, fars=args.far, impostors=args.impostors, seed=args.seed, official=official)
    print_table(rows, COLUMNS)
    settings = {**{k: v for k, v in vars(args).items() if k not in ("model", "pairs", "root")},
                "model": Path(args.model).name, "model_fingerprint": embedder.fingerprint,
                "runtime": embedder.runtime, "pairs": Path(args.pairs).name, "sets": counts,
                "embed_s": embed_s, "load_avg_1m": os.getloadavg()[0]}
    print(f"wrote {write_results('calibration', device_name('cpu'), settings, rows)}")


if __name__ == "__main__":
    main()
