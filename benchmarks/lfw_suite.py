"""The LFW fold-k tables of ``benchmarks/README.md``: losses, backbones and regularisers.

Every row is one ``benchmarks/lfw_protocol.py`` run with the same time budget, fold and base recipe
(ResNet-18 x0.25, 64 px, 256-d, AdamW 3e-3, batch 128, one torch thread, one loader worker); rows
differ only in what the table varies. The recipes live in ``configs/lfw_suite.yaml``. ``--jobs 2`` runs two rows at once (one per core here); rows
already in the results file are skipped unless ``--force``.

    python benchmarks/lfw_suite.py --group loss backbone --minutes 10 --jobs 2
    python benchmarks/lfw_suite.py --group regulariser --base sphereface --minutes 10 --jobs 2
    python benchmarks/lfw_suite.py --group recipe --minutes 30 --jobs 2
    python benchmarks/lfw_suite.py --group lever --minutes 30 --jobs 2   # then benchmarks/levers.py
    python benchmarks/lfw_suite.py --group longer --minutes 60 --jobs 2  # the same levers at 60 minutes
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

import yaml  # noqa: E402

from benchmarks.common import RESULTS_DIR, device_name, device_slug  # noqa: E402

RECIPES_FILE = ROOT / "configs" / "lfw_suite.yaml"


def merged(*mappings: dict) -> dict:
    """Nested mappings merged left to right (a later value wins; sub-mappings merge)."""
    out: dict = {}
    for m in mappings:
        for key, value in m.items():
            out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def set_options(config: dict, prefix: str = "") -> list[str]:
    """A nested config mapping as ``facefuse train`` options: ``--set dotted.key=value`` each."""
    opts: list[str] = []
    for key, value in config.items():
        if isinstance(value, dict) and key != "pair_options":
            opts += set_options(value, f"{prefix}{key}.")
        else:
            opts += ["--set", f"{prefix}{key}={value if isinstance(value, str) else json.dumps(value)}"]
    return opts


def load_recipes(path: Path = RECIPES_FILE) -> dict:
    return yaml.safe_load(path.read_text())


RECIPES = load_recipes()
BASE = set_options(RECIPES["base"])
LOSSES = RECIPES["loss"]


def plan(groups: list[str], base_row: str) -> list[tuple[str, float, list[str]]]:
    """``(row name, budget share, train options added to BASE)`` in run order (a stage precedes its
    sequel), from ``configs/lfw_suite.yaml``."""
    rows: list[tuple[str, float, list[str]]] = []
    if "loss" in groups:
        for name, seq in RECIPES["sequential"].items():
            rows.append((f"loss/{seq['first']['name']}", seq["first"]["share"], set_options(seq["first"]["config"])))
        rows += [(f"loss/{name}", 1.0, set_options(cfg)) for name, cfg in LOSSES.items()]
        for name, seq in RECIPES["sequential"].items():
            rows.append((f"loss/{name}", 1.0 - seq["first"]["share"],
                         [*set_options(seq["then"]), "--init-from", f"@loss/{seq['first']['name']}"]))
    if "backbone" in groups:
        rows += [(f"backbone/{name}", 1.0, set_options(cfg)) for name, cfg in RECIPES["backbone"].items()]
    for group in ("recipe", "repeat", "lever", "longer"):
        if group in groups:
            rows += [(name, 1.0, set_options(cfg)) for name, cfg in RECIPES[group].items()]
    if "regulariser" in groups:
        rows += [(f"regulariser/{base_row}+{name}", 1.0, set_options(merged(LOSSES[base_row], cfg)))
                 for name, cfg in RECIPES["regulariser"].items()]
    return rows


def run_dir(runs: Path, fold: int, name: str) -> Path:
    return runs / f"fold{fold}-{name}"  # where lfw_protocol.py puts the run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--group", nargs="+", default=["loss", "backbone"], choices=["loss", "backbone", "regulariser", "repeat", "recipe", "lever", "longer"])
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
