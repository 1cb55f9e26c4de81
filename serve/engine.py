"""The work behind each endpoint, on top of :mod:`facefuse.api`, off the event loop.

Three executors: ``cpu`` (decode, detect and align, search; ``settings.threads`` threads), ``runner``
(one thread: the model runs of the :class:`~.batcher.MicroBatcher`, one batch at a time, each using
every core through ONNX Runtime) and ``writer`` (one thread: enrolments and removals, each durable
when the gallery call returns, which is when the request is answered). Searches read the gallery's
snapshot (``Gallery.snapshot``: reloaded only after a write, by this service or a shell's
``facefuse index add``) under a lock that keeps a newer snapshot from being replaced by an older
one; they never wait for a writer, whose lock (the gallery's ``flock``) only writers take.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import PurePath

import numpy as np

from facefuse.api import FaceResult, Match, PhotoSearch, Verification, load_model, open_gallery
from facefuse.core.errors import FacefuseError, ParameterError
from facefuse.core.settings import ALIGNMENTS

from .batcher import MicroBatcher
from .keys import KeyRing
from .metrics import Metrics
from .settings import ServeSettings
from .uploads import UploadError, decode_photo

MAX_TOP_K = 100
MAX_NAME = 100
RESERVED_NAMES = ("unknown",)  # what a search answers below the threshold
UPLOAD_LABEL = re.compile(r"upload:[0-9a-f]{16}")  # what an enrolment records as the face's source


class NotFound(FacefuseError):
    """Nothing matches what the request names (answered 404)."""


class Service:
    """The loaded model and gallery, the executors and the batcher, and one coroutine per endpoint."""

    def __init__(self, settings: ServeSettings):
        self.settings = settings
        self.keys = KeyRing.load(settings.keys) if settings.keys is not None else None
        self.model = load_model(settings.model)
        self.gallery = open_gallery(settings.index, self.model)
        self.gallery.snapshot()  # refuses a gallery another model made, before serving
        made = self.gallery.settings
        # every alignment embeds its crops as the gallery's rows were made (flip), never centred
        self.models = {a: self.model.with_settings(flip=made.flip, align=a, center=False,
                                                   batch_size=settings.max_batch) for a in ALIGNMENTS}
        self.metrics = Metrics()
        self.cpu = ThreadPoolExecutor(settings.threads, thread_name_prefix="facefuse-cpu")
        self.runner = ThreadPoolExecutor(1, thread_name_prefix="facefuse-model")
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="facefuse-writer")
        self.batcher = MicroBatcher(self.models["none"].embed_faces, self.runner, max_batch=settings.max_batch,
                                    max_wait_s=settings.max_wait_ms / 1e3, observe=self.metrics.batch)
        self._snapshot_lock = threading.Lock()
        self.started = time.time()
        self._warm_up()

    def _warm_up(self) -> None:
        """One run of the network and of the detector, so the first request does not pay for loading."""
        from PIL import Image

        blank = Image.new("RGB", (self.model.meta.image_size,) * 2, (128, 128, 128))
        self.models["none"].embed_faces(self.models["none"].faces(blank))
        if self.settings.align == "landmarks":
            self.models["landmarks"].faces(blank)

    # ------------------------------------------------------------ life
    async def start(self) -> None:
        self.batcher.start()

    async def stop(self) -> None:
        await self.batcher.stop()
        for ex in (self.writer, self.runner, self.cpu):
            ex.shutdown(wait=True, cancel_futures=False)

    async def _in(self, executor, fn, *args, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(executor, functools.partial(fn, *args, **kwargs))

    # ------------------------------------------------------------ checks
    def _align(self, align: str | None) -> str:
        a = align or self.settings.align
        if a not in ALIGNMENTS:
            raise ParameterError("align", a, f"unknown alignment; valid: {', '.join(ALIGNMENTS)}")
        return a

    def _decision(self, threshold: float | None, far: float | None):
        """``(threshold, source, far)`` a request decides at: its own, else the service's, else the
        model's calibrated one (``far`` is that threshold's FAR, when it is a calibrated one)."""
        from facefuse.verification.thresholds import resolve_threshold

        if threshold is None and far is None:
            threshold, far = self.settings.threshold, self.settings.far
        t, source = resolve_threshold(self.model.meta, threshold, far, self.model.path.name)
        return t, source, (None if threshold is not None else _far_of(self.model.meta, t))

    @staticmethod
    def check_top_k(top_k: int) -> int:
        if not 1 <= top_k <= MAX_TOP_K:
            raise ParameterError("top_k", top_k, f"must be in [1, {MAX_TOP_K}]")
        return top_k

    @staticmethod
    def check_name(name: str) -> str:
        if not name or len(name) > MAX_NAME or not name.isprintable() or name != name.strip():
            raise ParameterError("identity", name, f"an identity is 1-{MAX_NAME} printable characters, "
                                 "no leading or trailing space")
        if name.lower() in RESERVED_NAMES:
            raise ParameterError("identity", name, "reserved: searches answer it for faces below the threshold")
        return name

    # ------------------------------------------------------------ CPU steps (in the cpu pool)
    def _faces(self, data: bytes, field: str, align: str):
        im = decode_photo(data, field, self.settings.max_pixels)
        return im, self.models[align].faces(im)

    def _search_rows(self, rows: np.ndarray, top_k: int, t: float | None) -> list[dict]:
        if len(rows) == 0:
            return []
        with self._snapshot_lock:  # snapshot() reloads after a write; one thread at a time swaps it
            try:
                return self.gallery.search_vectors(rows, top_k=top_k, threshold=t)
            except FacefuseError:
                if len(self.gallery.snapshot()) > 0:
                    raise
                return [{"identity": "unknown", "score": None, "matches": []} for _ in rows]  # all removed

    # ------------------------------------------------------------ endpoints
    async def search(self, data: bytes, *, align: str | None, top_k: int, threshold: float | None,
                     far: float | None) -> dict:
        """Every face of the photo, largest first, with its top-``top_k`` identities."""
        align, top_k = self._align(align), self.check_top_k(top_k)
        t, source, t_far = self._decision(threshold, far)
        with self.batcher.expect() as ticket:
            im, faces = await self._in(self.cpu, self._faces, data, "photo", align)
            rows = await self.batcher.embed(faces, ticket)
        hits = await self._in(self.cpu, self._search_rows, rows, top_k, t)
        results = [FaceResult(f.to_dict()["box"], f.score, f.landmarks, h["identity"], h["score"],
                              [Match(m["identity"], m["score"], _shown(m["path"])) for m in h["matches"]], t)
                   for f, h in zip(faces, hits)]
        doc = PhotoSearch(results, im.width, im.height, None if faces else "no face found").to_dict()
        return {**doc, "align": align, "threshold_source": source, "far": t_far}

    async def verify(self, a: bytes, b: bytes, *, align: str | None, threshold: float | None,
                     far: float | None) -> dict:
        """The largest face of each photo compared: cosine, and same / different at the threshold."""
        from facefuse.verification.thresholds import calibration_mismatch

        align = self._align(align)
        t, source, t_far = self._decision(threshold, far)
        with self.batcher.expect() as ticket:
            (_, fa), (_, fb) = await asyncio.gather(self._in(self.cpu, self._faces, a, "a", align),
                                                    self._in(self.cpu, self._faces, b, "b", align))
            for field, faces in (("a", fa), ("b", fb)):
                if not faces:
                    raise UploadError(422, f"{field}: no face found")
            rows = await self.batcher.embed([fa[0], fb[0]], ticket)
        score = float(rows[0] @ rows[1])
        note = calibration_mismatch(self.model.meta, self.models[align].settings) \
            if threshold is None and t is not None and source != "threshold given" else None
        v = Verification(score, None if t is None else bool(score >= np.float32(t)), t, source, note)
        return {**v.to_dict(), "far": t_far, "align": align, "faces": {"a": fa[0].to_dict(), "b": fb[0].to_dict()}}

    async def enrol(self, identity: str, data: bytes, *, align: str | None) -> dict:
        """The photo's largest face enrolled under ``identity``: answered once it is durable."""
        identity, align = self.check_name(identity), self._align(align)
        with self.batcher.expect() as ticket:
            _, faces = await self._in(self.cpu, self._faces, data, "photo", align)
            if not faces:
                raise UploadError(422, "photo: no face found")
            rows = await self.batcher.embed(faces[:1], ticket)
        image = "upload:" + hashlib.sha256(data).hexdigest()[:16]  # a label (UPLOAD_LABEL), never a file path
        info = await self._in(self.writer, self.gallery.add_vectors, rows, [identity], [image])
        self.metrics.count("enrolled")
        return {"identity": identity, "image": image, "face": faces[0].to_dict(), "faces_in_photo": len(faces),
                "gallery": {"rows": info.size, "identities": info.identities}}

    async def remove(self, identity: str, image: str | None = None) -> dict:
        """Every face of ``identity`` (or only those enrolled from ``image``, the label an enrolment
        answered) removed, durably."""
        if image is not None and not UPLOAD_LABEL.fullmatch(image):
            raise ParameterError("image", image, "not an enrolment label (upload:<16 hex digits>, as enrolling answered)")
        try:
            n = await self._in(self.writer, self.gallery.remove, identity=identity, image=image)
        except ParameterError:
            raise NotFound(f"{identity}{'' if image is None else ' / ' + image}: not enrolled") from None
        self.metrics.count("removed", n)
        return {"identity": identity, "image": image, "removed": n}

    async def identities(self) -> dict:
        names = await self._in(self.cpu, self.gallery.identities)
        return {"identities": names, "count": len(names)}

    async def health(self) -> dict:
        rows = await self._in(self.cpu, len, self.gallery)
        m = self.model
        return {"status": "ok", "model": {"name": m.path.name, "fingerprint": m.fingerprint, "dim": m.dim,
                                          "calibrated": bool((m.meta.thresholds or {}).get("at_far"))},
                "gallery": {"rows": rows}, "align": self.settings.align,
                "batching": {"max_batch": self.settings.max_batch, "max_wait_ms": self.settings.max_wait_ms},
                "auth": self.keys is not None, "uptime_s": round(time.time() - self.started, 1)}

    async def metrics_text(self) -> str:
        rows = await self._in(self.cpu, len, self.gallery)
        return self.metrics.render({
            "gallery_rows": ("Live rows in the gallery", rows),
            "batch_queue": ("Submissions waiting for a model run", self.batcher.queued),
            "uptime_seconds": ("Seconds since the service started", time.time() - self.started),
        })


def _shown(path: str) -> str:
    """How a gallery row's source is answered: an enrolment label as is, a file by its name only
    (the folders of the machine that built the gallery are not the client's business)."""
    return path if UPLOAD_LABEL.fullmatch(path) else PurePath(path).name


def _far_of(meta, t: float | None) -> float | None:
    """The FAR a stored threshold was calibrated at (None for a threshold not from the record)."""
    if t is None:
        return None
    for e in (getattr(meta, "thresholds", None) or {}).get("at_far") or []:
        if float(e["threshold"]) == t:
            return float(e["far"])
    return None
