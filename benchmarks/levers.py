"""The robustness-levers table: each lever row of ``configs/lfw_suite.yaml`` scored on every set.

Every row was trained by ``lfw_suite.py --group lever`` (the default recipe plus one lever, LFW
fold k held out, the same budget, two rows at once) or ``--group longer`` (the same at 60 minutes) and scored by ``cross_dataset.py --tag
lever-<name>`` (``-detect``, ``-center``, ``-center-detect``: the same model with those test-time options); the baseline is ``lever/default`` (the default recipe trained beside the levers), and
the README's run of the default recipe (``cross_dataset.py`` without a tag) is shown too. This
script only joins those JSON files: one row per
lever with its training figures (epochs, images/s from ``lfw_protocol``) and, per set, 10-fold
accuracy, AUC, rank-1 and the FAR realised at the LFW-calibrated 1e-2 threshold, then the change of
each figure against the baseline and against the baseline's second seed (the noise level).

    python benchmarks/levers.py            # after lfw_suite.py --group lever and cross_dataset.py

Writes ``benchmarks/results/levers-<device-slug>.json`` and ``plots/levers.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS_DIR, device_name, device_slug, print_table, write_results  # noqa: E402
from benchmarks.lfw_suite import RECIPES  # noqa: E402

SETS = ("lfw-fold0", "orl", "yale")
FIGURES = ("accuracy", "auc", "rank1", "realised_far")


def cross_dataset_file(tag: str, slug: str) -> Path:
    return RESULTS_DIR / (f"cross_dataset{'-' + tag if tag else ''}-{slug}.json")


def lever_row(name: str, tag: str, slug: str, protocol: dict) -> dict | None:
    path = cross_dataset_file(tag, slug)
    if not path.is_file():
        return None
    doc = json.loads(path.read_text())
    row = {"lever": name, "source": path.name, "model": doc["settings"]["model"]}
    trained = protocol.get(name.split(" + ")[0])
    row["epochs"] = trained["epochs_done"] if trained else None
    row["images_per_s"] = round(trained["images_per_s"], 1) if trained else None
    by_set = {r["set"]: r for r in doc["results"]}
    for s in SETS:
        for f in FIGURES:
            row[f"{s}:{f}"] = by_set[s][f] if s in by_set else None
    row["cross_auc_mean"] = (row["orl:auc"] + row["yale:auc"]) / 2
    return row


def markdown(rows: list[dict]) -> str:
    """The README's table: per lever, epochs, then per set AUC and rank-1, and the realised FAR."""
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    num = lambda v, d=3: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
    lines = ["| lever | epochs | LFW fold 0 acc / AUC / rank-1 | ORL AUC / rank-1 | Yale AUC / rank-1 | "
             "ORL / Yale FAR at the LFW 1e-2 threshold |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['lever']} | {r['epochs'] or '-'} | {pct(r['lfw-fold0:accuracy'])} / "
                     f"{num(r['lfw-fold0:auc'])} / {pct(r['lfw-fold0:rank1'])} | {num(r['orl:auc'])} / "
                     f"{pct(r['orl:rank1'])} | {num(r['yale:auc'])} / {pct(r['yale:rank1'])} | "
                     f"{num(r['orl:realised_far'])} / {num(r['yale:realised_far'])} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """AUC and rank-1 per set, one bar group per lever (a matplotlib Figure, saved atomically)."""
    import numpy as np
    from matplotlib.figure import Figure

    from facefuse.core.files import atomic_path

    fig = Figure(figsize=(10, 4), dpi=120)
    axes = fig.subplots(1, 2)
    x = np.arange(len(SETS))
    w = 0.8 / len(rows)
    for ax, figure in zip(axes, ("auc", "rank1")):
        for k, r in enumerate(rows):
            ax.bar(x + k * w, [r[f"{s}:{figure}"] or 0 for s in SETS], w, label=r["lever"])
        ax.set_xticks(x + 0.4 - w / 2, SETS)
        ax.set_title(figure)
        ax.set_ylim(0.3 if figure == "rank1" else 0.75, 1)
        ax.grid(alpha=0.3, axis="y")
    axes[1].legend(fontsize=7, loc="lower right")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, bbox_inches="tight", format="png")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline-tag", default="", help="cross_dataset tag of the README's default run")
    ap.add_argument("--plot", type=Path, default=RESULTS_DIR / "plots" / "levers.png")
    args = ap.parse_args(argv)
    slug = device_slug(device_name("cpu"))
    protocol_file = RESULTS_DIR / f"lfw_protocol-{slug}.json"
    protocol = {r["name"]: r for r in json.loads(protocol_file.read_text())["results"]} if protocol_file.is_file() else {}

    levers = {**RECIPES["lever"], **RECIPES.get("longer", {})}  # the 30-minute rows, then the 60-minute ones
    candidates = [("default (README run)", args.baseline_tag)] + [
        (name, "lever-" + name.split("/", 1)[1]) for name in levers]
    # the same models scored with --detect haar (ORL and Yale cropped around the detected face), and
    # with --center (each set centred on its own mean), alone and with the crop: test-time levers
    suffix = lambda tag, extra: f"{tag}-{extra}" if tag else extra  # noqa: E731
    candidates += [(f"{name} + {extra.replace('-', ' + ')}", suffix(tag, extra))
                   for extra in ("detect", "center", "center-detect") for name, tag in candidates]
    rows, missing = [], []
    for name, tag in candidates:
        row = lever_row(name, tag, slug, protocol)
        (rows.append(row) if row else missing.append(name) if " + " not in name else None)
    by_name = {r["lever"]: r for r in rows}
    # the baseline: the default recipe trained beside the levers; else the README's run of it
    base = by_name.get("lever/default") or by_name.get("default (README run)")
    if base is None:
        sys.exit(f"error: {cross_dataset_file('lever-default', slug)}: no baseline scored; run lfw_suite.py --group "
                 "lever --only lever/default and cross_dataset.py --tag lever-default first")
    for r in rows:
        for s in SETS:
            for f in ("auc", "rank1"):
                r[f"d_{s}:{f}"] = r[f"{s}:{f}"] - base[f"{s}:{f}"]
    noise = None
    if "lever/default-seed1" in by_name and base["lever"] == "lever/default":  # one recipe, two seeds
        seed1 = by_name["lever/default-seed1"]
        noise = {f"{s}:{f}": abs(seed1[f"{s}:{f}"] - base[f"{s}:{f}"]) for s in SETS for f in ("accuracy", "auc", "rank1")}
    columns = ["lever", "epochs", "images_per_s", *[f"{s}:{f}" for s in SETS for f in ("accuracy", "auc", "rank1", "realised_far")],
               "cross_auc_mean"]
    print_table(rows, columns)
    if missing:
        print(f"not yet scored: {', '.join(missing)}")
    if noise:
        print("seed spread (|default - default-seed1|):", {k: round(v, 4) for k, v in noise.items()})
    print()
    print(markdown(rows))
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    plot(rows, args.plot)
    settings = {"sets": list(SETS), "baseline": base["lever"], "noise": noise, "not_scored": missing,
                "plot": args.plot.name, "levers": levers}
    print(f"wrote {write_results('levers', device_name('cpu'), settings, rows)} and {args.plot}")


if __name__ == "__main__":
    main()
