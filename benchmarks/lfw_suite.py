"""The LFW fold-k tables of ``benchmarks/README.md``: losses, backbones and regularisers.

Every row is one ``benchmarks/lfw_protocol.py`` run with the same time budget, fold and base recipe
(ResNet-18 x0.25, 64 px, 256-d, AdamW 3e-3, batch 128, one torch thread, one loader worker); rows
differ only in what the table varies. ``--jobs 2`` runs two rows at once (one per core here); rows
already in the results file are skipped unless ``--force``.

    python benchmarks/lfw_suite.py --group loss backbone --minutes 10 --jobs 2
    python benchmarks/lfw_suite.py --group regulariser --base sphereface --minutes 10 --jobs 2
    python benchmarks/lfw_suite.py --group recipe --minutes 30 --jobs 2
    python benchmarks/lfw_suite.py --list
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS_DIR, device_name, device_slug  # noqa: E402

BASE = ("--backbone resnet18 --width 0.25 --image-size 64 --embedding-dim 256 --batch-size 128 --min-images 2 "
        "--val-fraction 0.03 --threads 1 --workers 1 --lr 3e-3 --warmup-epochs 1").split()

ARCFACE = "--loss arcface --scale 32 --margin 0.3".split()
PK = "--sampler pk --pk 32 4".split()

# row name -> train options added to BASE.
LOSSES = {
    "softmax": "--loss softmax".split(),
    "softmax-ls": "--loss softmax --label-smoothing 0.1".split(),
    "sphereface": "--loss sphereface --scale 32 --margin 1.35".split(),
    "cosface": "--loss cosface --scale 32 --margin 0.25".split(),
    "arcface": ARCFACE,
    "arcface-s64-m0.5": "--loss arcface --scale 64 --margin 0.5".split(),  # the paper's setting
    "triplet": ["--loss", "triplet", *PK],
    "arcface+center": [*ARCFACE, "--pair-loss", "center", "--pair-weight", "1.0"],
    "supcon": ["--loss", "supcon", *PK],
}
# Sequential: name -> (first stage, its share of the budget, options of the second stage). ArcFace for
# 70% of the budget, then triplet fine-tuning of that model for the rest.
SEQUENTIAL = {"arcface-then-triplet": ("arcface-stage1", 0.7, ["--loss", "triplet", *PK, "--lr", "3e-4",
                                                              "--warmup-epochs", "0"])}
BACKBONES = {
    "convnext_atto-x0.5": ["--backbone", "convnext_atto", "--width", "0.5", *ARCFACE],
    "mobilenetv2-x0.5": ["--backbone", "mobilenetv2", "--width", "0.5", *ARCFACE],
}
# Candidates for the default recipe, run at the 30-minute budget of the CPU target: the best
# backbone and loss of the 10-minute tables (no regulariser helped there), without and with geometric +
# photometric augmentation (the ConvNeXt 10-minute run already reached train 0.99, held-out 0.70).
CANDIDATE = ["--backbone", "convnext_atto", "--width", "0.5", *"--loss sphereface --scale 32 --margin 1.35".split()]
RECIPES = {
    "recipe/convnext-sphereface": CANDIDATE,
    "recipe/convnext-sphereface-aug": [*CANDIDATE, *"--crop-scale 0.8 --color-jitter 0.2".split()],
}
# A second seed of a row, to see the run-to-run spread next to the differences between rows.
REPEATS = {"loss/sphereface-seed1": [*LOSSES["sphereface"], "--seed", "1"]}
REGULARISERS = {
    "label-smoothing": "--label-smoothing 0.1".split(),
    "mixup-cutmix": "--mixup 0.2 --cutmix 1.0".split(),
    "stochastic-depth": "--drop-path 0.1".split(),
    "ema": "--ema-decay 0.99".split(),
}


def plan(groups: list[str], base_row: str) -> list[tuple[str, float, list[str]]]:
    """``(row name, budget share, train options)`` in run order (a stage precedes its sequel)."""
    rows: list[tuple[str, float, list[str]]] = []
    if "loss" in groups:
        for name, (stage1, share, _) in SEQUENTIAL.items():
            rows.append((f"loss/{stage1}", share, ARCFACE))
        rows += [(f"loss/{name}", 1.0, opts) for name, opts in LOSSES.items()]
        for name, (stage1, share, opts) in SEQUENTIAL.items():
            rows.append((f"loss/{name}", 1.0 - share, [*opts, "--init-from", f"@loss/{stage1}"]))
    if "backbone" in groups:
        rows += [(f"backbone/{name}", 1.0, opts) for name, opts in BACKBONES.items()]
    if "recipe" in groups:
        rows += [(name, 1.0, opts) for name, opts in RECIPES.items()]
    if "repeat" in groups:
        rows += [(name, 1.0, opts) for name, opts in REPEATS.items()]
    if "regulariser" in groups:
        base = LOSSES[base_row]
        rows += [(f"regulariser/{base_row}+{name}", 1.0, [*base, *opts]) for name, opts in REGULARISERS.items()]
    return rows


def run_dir(runs: Path, fold: int, name: str) -> Path:
    return runs / f"fold{fold}-{name}"  # where lfw_protocol.py puts the run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--group", nargs="+", default=["loss", "backbone"], choices=["loss", "backbone", "regulariser", "repeat", "recipe"])
    ap.add_argument("--base", default="arcface", choices=sorted(LOSSES), help="loss row the regularisers modify")
    ap.add_argument("--minutes", type=float, default=10.0, help="training budget of every row")
    ap.add_argument("--fold", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=2, help="rows run at once")
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "lfw")
    ap.add_argument("--force", action="store_true", help="rerun rows already in the results file")
    ap.add_argument("--rerun", nargs="+", default=[], help="rerun these rows even if present")
    ap.add_argument("--only", nargs="+", default=None, help="run only these rows of the plan")
    ap.add_argument("--list", action="store_true", help="print the plan and exit")
    args = ap.parse_args(argv)

    rows = plan(args.group, args.base)
    if args.only:
        unknown = set(args.only) - {name for name, _, _ in rows}
        if unknown:
            sys.exit(f"error: --only {', '.join(sorted(unknown))}: not in the plan of --group {' '.join(args.group)}")
        rows = [r for r in rows if r[0] in args.only]
    results = RESULTS_DIR / f"lfw_protocol-{device_slug(device_name('cpu'))}.json"  # where lfw_protocol.py writes
    done = set()
    if results.is_file() and not args.force:
        done = {r["name"] for r in json.loads(results.read_text())["results"]
                if r["fold"] == args.fold and abs(r.get("budget_minutes", -1) - args.minutes) < 1e-6}
    done -= set(args.rerun)
    todo = [r for r in rows if r[0] not in done]
    for name, share, opts in rows:
        print(f"{'done' if name in done else 'todo'}  {name:40s} {share * args.minutes:5.1f} min  {' '.join(opts)}")
    if args.list or not todo:
        return

    args.runs.mkdir(parents=True, exist_ok=True)
    finished: dict[str, int] = {name: 0 for name in done}

    def launch(row):
        name, share, opts = row
        opts = list(opts)
        if "--init-from" in opts:  # wait for the stage this row continues
            i = opts.index("--init-from") + 1
            stage = opts[i][1:]
            while stage not in finished:
                time.sleep(5)
            if finished[stage] != 0:
                print(f"FAILED  {name}: its first stage {stage} failed", flush=True)
                return 1
            opts[i] = str(run_dir(args.runs, args.fold, stage) / "train")
        cmd = [sys.executable, str(ROOT / "benchmarks" / "lfw_protocol.py"), "--fold", str(args.fold),
               "--minutes", str(round(share * args.minutes, 3)), "--budget-minutes", str(args.minutes),
               "--name", name, "--runs", str(args.runs), "--", *BASE, *opts]
        log = args.runs / f"fold{args.fold}-{name.replace('/', '-')}.log"  # flat, beside the run folders
        t0 = time.time()
        with open(log, "w") as f:
            rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT)
        print(f"{'ok' if rc == 0 else f'FAILED rc={rc}'}  {name} in {time.time() - t0:.0f} s (log {log})", flush=True)
        finished[name] = rc
        return rc

    with ThreadPoolExecutor(args.jobs) as pool:
        rcs = list(pool.map(launch, todo))
    sys.exit(1 if any(rcs) else 0)


if __name__ == "__main__":
    main()
