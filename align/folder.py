"""``facefuse align SRC OUT``: a folder of raw photos in, trainable template crops out.

Every image under ``src`` (identity sub-folders, or ``<identity>_<anything>`` files, at any depth)
becomes ``out/<same relative path>.jpg``: the largest face (by default) aligned onto the
template square (:class:`~facefuse.align.step.LandmarkAlign`), JPEG quality 95. Alongside:

- ``out/align.json``: the settings (detector, size, policies), written once; a later run into the
  same ``out`` must use the same settings;
- ``out/manifest.jsonl``: one JSON line per photo, appended and flushed to disk (fsync) after its
  crop is in place (crops are written atomically): ``src``, ``out`` (or null), ``status``,
  ``faces`` (how many were found), ``kept`` (the index, largest first, of the face written, or
  null), ``box``, ``score``, ``landmarks``, ``detector`` of that face, and ``reason`` for a photo
  without a crop.

Resumable: a photo with a manifest line is done and skipped (a crop without one, from a run that
was stopped between the two, is made again). A torn last line (power cut mid-write) is dropped.

Policies: ``on_none`` (no face found): ``skip`` (no crop; status ``no_face``), ``center`` (the
photo's centre square, resized: status ``center``, as lfw-112 treats its one undetected face) or
``error`` (stop with a one-line error naming the photo). ``on_multiple`` (several faces):
``largest`` (status ``aligned``, ``faces`` > 1) or ``skip`` (status ``multiple``). An unreadable
photo is recorded (status ``bad_image``) and counted, never written.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from facefuse.core.errors import BadImageError, FacefuseError, ParameterError
from facefuse.core.files import atomic_path, atomic_write_text
from facefuse.core.folders import images_under

from .detect import as_detector
from .step import LandmarkAlign, NoFaceError

ON_NONE = ("skip", "center", "error")
ON_MULTIPLE = ("largest", "skip")
MANIFEST = "manifest.jsonl"
SETTINGS = "align.json"
JPEG_QUALITY = 95


@dataclass
class AlignSummary:
    """Counts of one :func:`align_folder` run (``done_before``: photos skipped as already done)."""

    src: str
    out: str
    photos: int = 0
    done_before: int = 0
    aligned: int = 0
    several_faces: int = 0
    no_face: int = 0
    center: int = 0
    multiple_skipped: int = 0
    bad_image: int = 0
    seconds: float = 0.0
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def align_folder(src, out, *, detector="mtcnn", size: int = 112, workers: int | None = None,
                 on_none: str = "skip", on_multiple: str = "largest", progress=None) -> AlignSummary:
    """Align every photo under ``src`` into ``out`` (module docstring). ``workers``: processes
    (None: one per available core; 0: this process); ``progress``: None, True (a tqdm bar on
    stderr, shown on a terminal only) or a callable given the number of photos finished each time."""
    src, out = Path(src), Path(out)
    n_workers = _workers(workers)
    step = LandmarkAlign(as_detector(detector), size)
    jobs, settings = _plan(src, out, step, on_none, on_multiple)
    done = _done(out / MANIFEST)
    todo = [j for j in jobs if j[0] not in done]
    summary = AlignSummary(str(src), str(out), photos=len(jobs), done_before=len(jobs) - len(todo), settings=settings)
    t0 = time.perf_counter()
    bar, tick = _progress(progress, len(todo))
    try:
        with open(out / MANIFEST, "a") as manifest:
            for record in _run(step, todo, src, out, on_none, on_multiple, n_workers):
                manifest.write(json.dumps(record) + "\n")
                manifest.flush()
                os.fsync(manifest.fileno())
                _count(summary, record)
                tick(1)
    finally:
        if bar is not None:
            bar.close()
    summary.seconds = time.perf_counter() - t0
    return summary


# ---------------------------------------------------------------- planning and resuming
def _plan(src: Path, out: Path, step: LandmarkAlign, on_none, on_multiple):
    if on_none not in ON_NONE:
        raise ParameterError("on_none", on_none, f"valid: {', '.join(ON_NONE)}")
    if on_multiple not in ON_MULTIPLE:
        raise ParameterError("on_multiple", on_multiple, f"valid: {', '.join(ON_MULTIPLE)}")
    if not src.is_dir():
        raise ParameterError("src", src, "no such folder")
    if out.exists() and not out.is_dir():
        raise ParameterError("out", out, "exists and is not a folder")
    s, o = src.resolve(), out.resolve()
    if o == s or s in o.parents:
        raise ParameterError("out", out, f"is inside src={src}; write the crops elsewhere")
    if o in s.parents:
        raise ParameterError("out", out, f"holds src={src}; write the crops elsewhere")
    photos = images_under(src)
    if not photos:
        raise ParameterError("src", src, "holds no images (expected identity folders of photos)")
    jobs, seen = [], {}
    for p in photos:
        rel = p.relative_to(src).as_posix()
        dst = str(Path(rel).with_suffix(".jpg").as_posix())
        if dst in seen:
            raise FacefuseError(f"{src / seen[dst]} and {p} would both be written to {out / dst}; rename one")
        seen[dst] = rel
        jobs.append((rel, dst))
    det = step.detector
    settings = {"detector": det.name, "members": det.members, "size": step.size, "on_none": on_none,
                "on_multiple": on_multiple, "jpeg_quality": JPEG_QUALITY}
    out.mkdir(parents=True, exist_ok=True)
    stored = out / SETTINGS
    if stored.is_file():
        before = json.loads(stored.read_text())
        if before != settings:
            diff = ", ".join(f"{k}={before.get(k)}" for k in settings if before.get(k) != settings[k])
            raise ParameterError("out", out, f"was aligned with other settings ({diff}); use them or a new folder")
    else:
        atomic_write_text(stored, json.dumps(settings, indent=1) + "\n")
    return jobs, settings


def _done(manifest: Path) -> set[str]:
    """Sources with a complete manifest line; a torn last line is cut off the file."""
    if not manifest.is_file():
        return set()
    data = manifest.read_bytes()
    good = data.rfind(b"\n") + 1
    if good < len(data):
        with open(manifest, "r+b") as f:
            f.truncate(good)
    done = set()
    for k, line in enumerate(data[:good].decode("utf-8").splitlines(), 1):
        try:
            done.add(json.loads(line)["src"])
        except (ValueError, KeyError, TypeError):
            raise FacefuseError(f"{manifest}:{k}: not a manifest line; move the file away to start over") from None
    return done


def _workers(workers) -> int:
    if workers is None:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if not (isinstance(workers, int) and workers >= 0):
        raise ParameterError("workers", workers, "must be an integer >= 0 (0: in this process)")
    return workers


def _progress(progress, total):
    if progress is None or progress is False:
        return None, lambda n: None
    if progress is True:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="photo", desc="aligning", disable=None)
        return bar, bar.update
    return None, progress


def _count(summary: AlignSummary, record: dict) -> None:
    status = record["status"]
    summary.aligned += status == "aligned"
    summary.several_faces += status == "aligned" and record["faces"] > 1
    summary.no_face += status == "no_face"
    summary.center += status == "center"
    summary.multiple_skipped += status == "multiple"
    summary.bad_image += status == "bad_image"


# ---------------------------------------------------------------- the work, in worker processes
_STEP = None


def _init(step):
    global _STEP
    _STEP = step


def _run(step, todo, src, out, on_none, on_multiple, workers):
    args = [(rel, dst, str(src), str(out), on_none, on_multiple) for rel, dst in todo]
    if workers == 0 or len(todo) < 2:
        _init(step)
        yield from map(_one, args)
        return
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # no fork of a process that may hold threads (ORT, torch)
    with ctx.Pool(min(workers, len(todo)), initializer=_init, initargs=(step,)) as pool:
        yield from pool.imap_unordered(_one, args, chunksize=4)


def _one(arg) -> dict:
    """Align one photo; write its crop; return its manifest record."""
    from facefuse.core.images import open_rgb

    rel, dst, src, out, on_none, on_multiple = arg
    record = {"src": rel, "out": None, "status": None, "faces": 0, "kept": None}
    try:
        image = open_rgb(Path(src) / rel)
    except BadImageError as exc:
        return {**record, "status": "bad_image", "reason": exc.reason}
    faces = _STEP.detect(image)
    record["faces"] = len(faces)
    if not faces:
        if on_none == "error":
            raise NoFaceError(f"{Path(src) / rel}: no face found (on_none=skip or center goes on without it)")
        if on_none == "skip":
            return {**record, "status": "no_face", "reason": "no face found"}
        crop, status = _centre(image, _STEP.size), "center"
    elif len(faces) > 1 and on_multiple == "skip":
        return {**record, "status": "multiple", "reason": f"{len(faces)} faces found",
                "boxes": [f.to_dict()["box"] for f in faces]}
    else:
        crop, status = _STEP.crop(image, faces[0]), "aligned"
        record.update(kept=0, **faces[0].to_dict())
    target = Path(out) / dst
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp:
        crop.save(tmp, format="JPEG", quality=JPEG_QUALITY)
    return {**record, "out": dst, "status": status}


def _centre(image, size):
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return image.crop((left, top, left + side, top + side)).resize((size, size), resample=3)
