"""LFW identity-disjoint protocol.

Train only on the LFW identities that do not appear in fold k of ``pairs.txt`` (within a time
budget), then verify that fold's 600 pairs: accuracy with the threshold chosen by 10-way
cross-validation inside the fold (as the LFW protocol does across folds), ROC AUC, EER and TAR at
FAR 1e-2. Each run's row (config, figures, time) is merged into
``benchmarks/results/lfw_protocol-<device>.json`` under its ``--name``, and the fold's 600 flip-TTA
scores and pair labels into its sidecar ``lfw_protocol-<device>.scores.json`` (keyed by row name).
Paths in the row are stored relative to ``<data>`` ($FACEFUSE_DATA) and ``<runs>`` (``--runs``).

    python benchmarks/lfw_protocol.py --fold 0 --minutes 30 --name arcface -- --loss arcface
    python benchmarks/lfw_protocol.py --fold 0 --minutes 30 --name softmax -- --loss softmax

Everything after ``--`` is passed to ``cli.py train`` (so any recipe can be measured).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import (  # noqa: E402
    RESULTS_DIR,
    device_name,
    device_slug,
    path_roots,
    portable,
    print_table,
    read_sidecar,
    results_doc,
    sidecar_path,
    versions,
    write_json,
)
from facefuse.core.files import atomic_write_text  # noqa: E402
from facefuse.core.paths import lfw_dir  # noqa: E402


def fold_identities(pairs_file: Path, fold: int) -> set[str]:
    from facefuse.core.pairs import read_pairs

    pairs = read_pairs(pairs_file, root=pairs_file.parent / "lfw-112")
    keep = pairs.folds == fold
    names = set()
    for a, b, k in zip(pairs.paths_a, pairs.paths_b, keep):
        if k:
            names.add(Path(a).parent.name)
            names.add(Path(b).parent.name)
    return names


def evaluate(run_dir: Path, pairs_file: Path, fold: int, device: str) -> dict:
    """Verification figures of the trained model on the fold's pairs, without and with flip TTA."""
    import torch

    from facefuse.core.metrics import verification_metrics
    from facefuse.trainer.checkpoint import load_embedding_model
    from facefuse.trainer.evaluate import PairsValidator, embed_training_model

    model, meta = load_embedding_model(run_dir, device)
    val = PairsValidator(str(pairs_file), None, fold)
    out = {}
    for flip in (False, True):
        emb = embed_training_model(model, val.unique, image_size=meta.image_size, mean=meta.mean, std=meta.std,
                          device=torch.device(device), autocast=contextlib.nullcontext, flip=flip)
        scores = val.scores(emb)
        m = verification_metrics(scores, val.labels, folds=val.folds)
        out["flip" if flip else "plain"] = m
        if flip:  # kept so the ROC can be drawn from the committed JSON alone
            out["scores"] = [round(float(x), 5) for x in scores]
            out["labels"] = [int(x) for x in val.labels]
    return out


SCORE_KEYS = ("flip_scores", "pair_labels")  # per-pair data: kept in the sidecar, not in the row


def split_scores(row: dict) -> tuple[dict, dict]:
    """``(row without the per-pair data, {"fold", "pair_labels", "flip_scores"} for the sidecar)``."""
    main = {k: v for k, v in row.items() if k not in SCORE_KEYS}
    scores = {"fold": row["fold"], "pair_labels": row.get("pair_labels"), "flip_scores": row.get("flip_scores")}
    return main, scores


def merge_row(path: Path, row: dict, settings: dict, roots: dict | None = None) -> None:
    """Replace the row of the same name in the results file and its scores in the sidecar; a lock
    file serialises runs that finish together. ``roots``: extra placeholders for paths in the row."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    row, scores = split_scores(row)
    with open(path.with_name(f".{path.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        doc = json.loads(path.read_text()) if path.is_file() else results_doc("lfw_protocol", row["device"], {}, [])
        doc["results"] = [r for r in doc["results"] if r["name"] != row["name"]] + [row]
        doc["versions"] = versions()
        doc["settings"] = {**doc["settings"], **settings, "scores": sidecar_path(path).name}
        rows = read_sidecar(path)
        rows.pop(row["name"], None)
        if scores.get("flip_scores"):
            rows[row["name"]] = scores
        side = {"benchmark": "lfw_protocol", "device": doc["device"],
                "about": "per row: the fold's pair labels (1 = same person) and flip-TTA cosine scores, "
                         "in pairs.txt order", "rows": rows}
        write_json(sidecar_path(path), side, roots)  # first: a row never lacks its scores
        write_json(path, doc, roots)


def history(run_dir: Path) -> list[dict]:
    """Per-epoch training curve from the run's metrics.jsonl (rounded, for plots)."""
    keys = ("epoch", "elapsed_s", "train_loss", "train_accuracy", "val_accuracy", "lr")
    rows = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "epoch" in rec:
            rows.append({k: round(rec[k], 5) if isinstance(rec.get(k), float) else rec.get(k) for k in keys})
    return rows


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fold", type=int, default=0)
    ap.add_argument("--minutes", type=float, default=30.0, help="training time budget")
    ap.add_argument("--budget-minutes", type=float, default=None,
                    help="the table's budget this row belongs to (default --minutes; a stage of a sequential row "
                         "trains for part of it)")
    ap.add_argument("--name", required=True, help="row name in the results file")
    ap.add_argument("--runs", default=str(ROOT / "runs" / "lfw"), help="where run folders go (not committed)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--results", default=None, help="results JSON (default benchmarks/results/lfw_protocol-<device>.json)")
    args = ap.parse_args(argv)

    lfw = lfw_dir()
    pairs_file = lfw / "pairs.txt"
    if not pairs_file.is_file():
        sys.exit(f"error: {pairs_file} not found (set FACEFUSE_DATA)")
    run_dir = Path(args.runs) / f"fold{args.fold}-{args.name}"
    run_dir.mkdir(parents=True, exist_ok=True)
    if (run_dir / "train").exists():  # a rerun of this row: the benchmark's scratch run starts afresh
        print(f"removing the previous run {run_dir / 'train'}", flush=True)
        shutil.rmtree(run_dir / "train")
    exclude = run_dir / "exclude.txt"
    names = fold_identities(pairs_file, args.fold)
    atomic_write_text(exclude, "\n".join(sorted(names)) + "\n")

    from click.testing import CliRunner

    from facefuse import cli

    train_args = ["train", "--data", str(lfw / "lfw-112"), "--out", str(run_dir / "train"), "--device", args.device,
                  "--exclude-identities", str(exclude), "--time-budget", str(args.minutes), "--no-progress", *extra]
    if "--epochs" not in extra:
        train_args += ["--epochs", "1000"]  # the budget decides; the schedule follows the budget
    roots = {"<runs>": Path(args.runs).resolve()}
    portable(train_args, path_roots(roots))  # a path the results file would refuse fails now, not after training
    print("facefuse", " ".join(train_args), flush=True)
    t0 = time.time()
    r = CliRunner().invoke(cli.main, train_args, catch_exceptions=False)
    print(r.output, end="")
    if r.exit_code != 0:
        sys.exit(r.exit_code)
    wall = time.time() - t0
    summary = json.loads((run_dir / "train" / "summary.json").read_text())
    metrics = evaluate(run_dir / "train", pairs_file, args.fold, args.device)
    import yaml

    config = yaml.safe_load((run_dir / "train" / "config.yaml").read_text())
    dev = device_name(args.device)
    row = {
        "name": args.name, "fold": args.fold, "device": dev, "minutes": args.minutes,
        "budget_minutes": args.minutes if args.budget_minutes is None else args.budget_minutes, "train_args": train_args[1:],
        "backbone": summary["backbone"], "loss": summary["loss"], "pair_loss": summary["pair_loss"],
        "parameters": summary["parameters"], "identities": summary["identities"],
        "train_images": summary["train_images"], "excluded_identities": len(names),
        "epochs_done": summary["epochs_done"], "train_seconds": summary["train_seconds"], "wall_seconds": round(wall, 1),
        "images_per_s": round(summary["images_per_s"], 1), "val_accuracy": summary.get("val_accuracy"),
        **{f"{k}_{v}": metrics[k][v] for k in ("plain", "flip")
           for v in ("kfold_accuracy", "kfold_std", "roc_auc", "eer", "tar_at_far_1e-2", "tar_at_far_1e-3")},
        "config": config, "history": history(run_dir / "train"),
        "flip_scores": metrics["scores"], "pair_labels": metrics["labels"],
    }
    path = Path(args.results) if args.results else RESULTS_DIR / f"lfw_protocol-{device_slug(dev)}.json"
    settings = {"protocol": "LFW pairs.txt fold k, identity-disjoint training, 10-way CV inside the fold",
                "data": str(lfw / "lfw-112")}
    merge_row(path, row, settings, roots)
    print_table([row], ["name", "backbone", "loss", "epochs_done", "train_seconds", "plain_kfold_accuracy",
                        "flip_kfold_accuracy", "flip_roc_auc", "flip_eer", "flip_tar_at_far_1e-2"])
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
