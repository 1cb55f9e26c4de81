"""Where the Haar face detector puts its box on template-aligned faces, and how often it finds one.

``core.facecrop`` maps a detected box to the 112 x 112 template's square by the place and size the
box has on template-aligned LFW images. This script measures that (median centre and side over
every ``--every``-th image of the LFW identities outside fold ``--fold``, so nothing scored in
the cross-dataset benchmark is used), with its spread, and the detection rate on every set.

    python benchmarks/face_crop.py

Writes ``benchmarks/results/face_crop-<device-slug>.json``; ``TEMPLATE_BOX`` in core/facecrop.py
is its ``template_box`` (tests/test_facecrop.py checks).
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


def main(argv=None):
    from facefuse.core.facecrop import HaarFaceCrop
    from facefuse.core.folders import images_under
    from facefuse.core.paths import lfw_dir, shared_data_dir
    from facefuse.verification.calibrate import identity_indices
    from facefuse.core.images import open_rgb

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lfw", default=str(lfw_dir() / "lfw-112"))
    ap.add_argument("--pairs", default=str(lfw_dir() / "pairs.txt"))
    ap.add_argument("--fold", type=int, default=0, help="LFW fold left out of the measurement")
    ap.add_argument("--every", type=int, default=10, help="measure every n-th LFW image")
    ap.add_argument("--extra", nargs="*", default=[str(shared_data_dir() / "orl"), str(shared_data_dir() / "yale")])
    args = ap.parse_args(argv)

    crop = HaarFaceCrop()
    held_out = {p.parent.name for p in fold_images(args.pairs, args.lfw, args.fold)[0]}  # the fold's identities
    lfw = [p for p in images_under(args.lfw) if p.parent.name not in held_out][::args.every]
    t0 = time.perf_counter()
    boxes = [crop.box(open_rgb(p)) for p in lfw]
    seconds = (time.perf_counter() - t0) / len(lfw)
    found = np.array([b for b in boxes if b is not None], dtype=np.float64)
    cx, cy, side = found[:, 0] + found[:, 2] / 2, found[:, 1] + found[:, 3] / 2, found[:, 2]
    spread = {name: [float(v) for v in np.percentile(a, [10, 25, 75, 90])]
              for name, a in (("centre_x", cx), ("centre_y", cy), ("side", side))}
    template_box = [float(np.median(cx)), float(np.median(cy)), float(np.median(side))]
    rows = [{"set": f"lfw-112 (not fold {args.fold}, every {args.every}th)", "images": len(lfw),
             "found": int(len(found)), "rate": len(found) / len(lfw)}]
    for folder in args.extra:
        paths, _, _ = identity_indices(folder)
        n = sum(crop.box(open_rgb(p)) is not None for p in paths)
        rows.append({"set": Path(folder).name, "images": len(paths), "found": n, "rate": n / len(paths)})
    print_table(rows, ["set", "images", "found", "rate"])
    print(f"template box (centre x, centre y, side) on 112 px: {template_box}; percentiles 10/25/75/90: {spread}")
    settings = {"detector": "OpenCV haarcascade_frontalface_default, scaleFactor 1.1, minNeighbors 5, "
                            f"min face {crop.min_face} of the shorter side, largest box",
                "template_box": template_box, "template_box_percentiles": spread, "template_size": 112,
                "seconds_per_image": seconds, "fold": args.fold, "every": args.every}
    print(f"wrote {write_results('face_crop', device_name('cpu'), settings, rows)}")


if __name__ == "__main__":
    main()
