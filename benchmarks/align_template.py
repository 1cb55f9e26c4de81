"""Where each landmark detector puts the five points on template-aligned faces: the templates.

``facefuse.align`` warps a photo's face onto its detector's template. The model was trained on
LFW's template-aligned crops (``lfw-112``: the data set's aligner mapped five landmarks onto
ArcFace's 112 x 112 template), so the template of a detector is where *that detector* finds the
five points on those crops: the per-coordinate median over every ``--every``-th image of the LFW
identities outside fold ``--fold`` (nothing the verification benchmark scores is used), with its
spread, the detection rate, and the distance to ArcFace's published template.

    python benchmarks/align_template.py                     # mtcnn, dlib-hog every 10th, dlib-cnn every 50th

Writes ``benchmarks/results/align_template-<device-slug>.json``; ``TEMPLATES`` in
``align/transform.py`` is its ``templates`` (tests/test_align_transform.py checks).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.calibration_transfer import fold_images  # noqa: E402
from benchmarks.common import device_name, print_table, write_results  # noqa: E402

EVERY = {"mtcnn": 10, "dlib-hog": 10, "dlib-cnn": 50}  # dlib-cnn: about 0.3 s an image here


def main(argv=None):
    from facefuse.align import ARCFACE_TEMPLATE, get_detector
    from facefuse.core.folders import images_under
    from facefuse.core.images import open_rgb
    from facefuse.core.paths import lfw_dir

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lfw", default=str(lfw_dir() / "lfw-112"))
    ap.add_argument("--pairs", default=str(lfw_dir() / "pairs.txt"))
    ap.add_argument("--fold", type=int, default=0, help="LFW fold left out of the measurement")
    ap.add_argument("--detectors", nargs="+", default=list(EVERY))
    ap.add_argument("--every", type=int, default=None, help="measure every n-th image (default: per detector)")
    args = ap.parse_args(argv)

    held_out = {p.parent.name for p in fold_images(args.pairs, args.lfw, args.fold)[0]}
    pool = [p for p in images_under(args.lfw) if p.parent.name not in held_out]
    rows, templates, spread = [], {}, {}
    for name in args.detectors:
        det = get_detector(name)
        every = args.every or EVERY.get(name, 10)
        paths = pool[::every]
        t0 = time.perf_counter()
        found = [det.detect(open_rgb(p)) for p in paths]
        seconds = (time.perf_counter() - t0) / len(paths)
        lm = np.stack([f[0].landmarks for f in found if f]).astype(np.float64)
        med = np.median(lm, axis=0)
        templates[name] = np.round(med, 2).tolist()
        spread[name] = {"p10": np.round(np.percentile(lm, 10, axis=0), 2).tolist(),
                        "p90": np.round(np.percentile(lm, 90, axis=0), 2).tolist()}
        iod = np.linalg.norm(ARCFACE_TEMPLATE[1] - ARCFACE_TEMPLATE[0])
        rows.append({"detector": name, "options": repr(det), "every": every, "images": len(paths),
                     "found": len(lm), "rate": len(lm) / len(paths), "ms_per_image": 1e3 * seconds,
                     "median_vs_arcface_px": float(np.linalg.norm(med - ARCFACE_TEMPLATE, axis=1).mean()),
                     "median_vs_arcface_iod": float(np.linalg.norm(med - ARCFACE_TEMPLATE, axis=1).mean() / iod)})
        print(f"{name}: {templates[name]}", flush=True)
    print_table(rows, ["detector", "every", "images", "found", "rate", "ms_per_image", "median_vs_arcface_px"])
    settings = {"templates": templates, "template_percentiles": spread, "template_size": 112, "fold": args.fold,
                "arcface_template": ARCFACE_TEMPLATE.tolist(),
                "what": "per-coordinate median of the largest face's landmarks on lfw-112 images of the "
                        "identities outside the fold (every n-th in sorted path order)"}
    print(f"wrote {write_results('align_template', device_name('cpu'), settings, rows)}")


if __name__ == "__main__":
    main()
