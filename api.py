"""facefuse's Python front door: a handful of calls over the stages that do the work.

    import facefuse

    model = facefuse.load_model("runs/lfw/model.onnx", flip=True)    # ONNX file or checkpoint / run folder
    v = model.verify("a.jpg", "b.jpg")                               # Verification(score=0.71, same=True, ...)
    report = model.verify_pairs("pairs.txt")                          # accuracy, AUC, TAR@FAR, ...
    model.calibrate("calibration_faces/")                             # thresholds stored in the model file
    gallery = facefuse.build_gallery("gallery/", "my-index", model)   # one folder per identity
    gallery.add(["new/Jane_Doe_0001.jpg"])
    for hit in gallery.search(["query.jpg"], top_k=3):
        print(hit.identity, hit.score)

Results are small dataclasses with the fields the CLI prints and a ``to_dict()`` for JSON. How
images become embeddings is one :class:`~facefuse.core.settings.EmbedSettings` (``flip``, ``align``,
``center``, ``batch_size``, ``workers``, ``skip_missing``), given to :func:`load_model` and kept by
the model, the calibration record, an ``embed`` folder and a gallery. Errors are
:class:`~facefuse.core.errors.FacefuseError` (a bad argument: :class:`~facefuse.core.errors.ParameterError`,
``far=0: ...``). The ``facefuse`` command is a thin layer over these calls.
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from facefuse.core.errors import ParameterError
from facefuse.core.settings import EmbedSettings


class _Result:
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- results


@dataclass
class Verification(_Result):
    """Two photos compared: their cosine ``score`` and, at ``threshold``, whether they are the same person."""

    score: float
    same: bool | None          # None without a threshold (no calibrated one, none given)
    threshold: float | None
    threshold_source: str | None
    note: str | None = None    # e.g. the stored threshold was calibrated under other settings


@dataclass
class PairsReport(_Result):
    """A pairs file scored: the summary ``facefuse verify`` prints (``result``: the per-pair scores)."""

    summary: dict
    result: object = field(repr=False)  # verification.scoring.VerifyResult: scores, decisions, CSV, ROC

    def to_dict(self) -> dict:
        return dict(self.summary)


@dataclass
class Calibration(_Result):
    """Thresholds at target false accept rates (``at_far``), the best-accuracy one and their provenance."""

    at_far: list
    best_accuracy: dict
    provenance: dict
    record: dict = field(repr=False)

    def to_dict(self) -> dict:
        return dict(self.record)


@dataclass
class Match(_Result):
    identity: str
    score: float
    path: str


@dataclass
class SearchResult(_Result):
    """One query's answer: the best identity (``unknown`` below ``threshold``) and the top matches."""

    path: str
    identity: str
    score: float | None
    matches: list[Match]
    threshold: float | None
    note: str | None = None
    faces: list | None = None  # every face found (FaceResult), when the photo was searched face by face

    @classmethod
    def from_dict(cls, d: dict) -> "SearchResult":
        return cls(d["path"], d["identity"], d["score"], [Match(**m) for m in d["matches"]], d["threshold"],
                   d.get("note"))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for key in ("note", "faces"):
            if d[key] is None:
                del d[key]
        return d


@dataclass
class FaceCrop:
    """One face of a photo: its ``box`` (x0, y0, x1, y1 in photo pixels), the detector's ``score``
    and ``landmarks`` (five points; None without landmark alignment) and ``image``, the crop the
    model embeds (aligned to the template; the whole photo with ``align="none"``)."""

    box: tuple[float, float, float, float]
    score: float | None
    landmarks: list | None
    image: object = field(repr=False)

    def to_dict(self) -> dict:
        return {"box": [round(float(v), 2) for v in self.box], "score": self.score, "landmarks": self.landmarks}


@dataclass
class FaceResult(_Result):
    """One face of a searched photo: where it is and who it is (``unknown`` below ``threshold``)."""

    box: list
    detection_score: float | None
    landmarks: list | None
    identity: str
    score: float | None
    matches: list[Match]
    threshold: float | None


@dataclass
class PhotoSearch(_Result):
    """Every face found in one photo, largest first (none: ``faces`` is empty and ``note`` says so)."""

    faces: list[FaceResult]
    width: int
    height: int
    note: str | None = None


@dataclass
class Enrolment(_Result):
    """What a build or an add changed, and what the gallery holds now."""

    folder: str
    added: int
    skipped: int
    size: int
    identities: int
    kind: str
    dim: int


# ---------------------------------------------------------------- the model


class Model:
    """An embedding model (ONNX Runtime or PyTorch) with the settings it embeds under."""

    def __init__(self, path: str | Path, settings: EmbedSettings = EmbedSettings(), *, device: str | None = None):
        from facefuse.export.runtime import load_embedder

        self.path = Path(path)
        self.embedder = load_embedder(self.path, device=device)
        self.settings = self._resolved(settings)

    def _resolved(self, settings: EmbedSettings) -> EmbedSettings:
        from facefuse.core.settings import resolve_align

        return settings.replace(align=resolve_align(settings.align, self.meta.alignment))

    @property
    def meta(self):
        return self.embedder.meta

    @property
    def dim(self) -> int:
        return self.embedder.dim

    @property
    def fingerprint(self) -> str:
        return self.embedder.fingerprint

    def with_settings(self, **changes) -> "Model":
        """The same loaded model under other settings (nothing is reloaded)."""
        other = object.__new__(Model)
        other.path, other.embedder = self.path, self.embedder
        other.settings = self._resolved(self.settings.replace(**changes))
        return other

    def embed(self, images, **changes) -> np.ndarray:
        """L2-normalised float32 embeddings (N x D) of ``images``: file paths, PIL images or RGB /
        grey ``uint8`` arrays (a single one or a list). ``changes`` override settings for this call."""
        settings = self.settings.replace(**changes)
        items = images if isinstance(images, (list, tuple)) else [images]
        if not items:
            raise ParameterError("images", images, "no images given")
        if all(isinstance(i, (str, Path)) for i in items):
            emb, _ = self.embedder.embed_paths(list(items), settings.replace(skip_missing=False))
            return emb
        return _embed_in_memory(self.embedder, [_as_pil(i) for i in items], settings)

    def faces(self, image) -> list[FaceCrop]:
        """The faces of one photo (a path, PIL image or array), largest first, each brought to the
        template by ``settings.align``: every detected face with ``landmarks``, the largest Haar box
        with ``haar``, the whole photo with ``none`` (an empty list: no face found)."""
        im = _as_pil(image)
        w, h = im.size
        if self.settings.align == "landmarks":
            from facefuse.export.runtime import landmark_aligner

            return [FaceCrop(f.box, float(f.score), np.asarray(f.landmarks).round(2).tolist(), crop)
                    for f, crop in landmark_aligner(self.meta.image_size).faces(im)]
        if self.settings.align == "haar":
            from facefuse.core.facecrop import HaarFaceCrop

            step = HaarFaceCrop()
            box = step.box(im)
            if box is None:
                return []
            x, y, bw, bh = box
            return [FaceCrop((x, y, x + bw, y + bh), None, None, step.crop_face(im, box))]
        return [FaceCrop((0.0, 0.0, float(w), float(h)), None, None, im)]

    def embed_faces(self, faces: list[FaceCrop]) -> np.ndarray:
        """Embeddings of :meth:`faces` crops (already brought to the template: no alignment again)."""
        if not faces:
            return np.zeros((0, self.dim), np.float32)
        return _embed_in_memory(self.embedder, [f.image for f in faces], self.settings.replace(align="none"))

    def verify(self, a, b, *, threshold: float | None = None, far: float | None = None) -> Verification:
        """Compare two photos (paths, PIL images or arrays) at ``threshold``, else the model's
        calibrated threshold (at ``far``)."""
        from facefuse.verification.thresholds import calibration_mismatch, resolve_threshold

        if self.settings.center:
            raise ParameterError("center", True, "centring needs a set of images; verify a pairs file instead")
        t, source = resolve_threshold(self.meta, threshold, far, self.path.name)
        notes = []
        if self.settings.align == "none":
            ea, eb = self.embed([a, b])
        else:  # the largest face of each photo; say when a photo had none or several
            crops = []
            for name, image in (("a", a), ("b", b)):
                im = _as_pil(image)
                faces = self.faces(im)
                if len(faces) != 1:
                    notes.append(f"{name}: " + (f"{len(faces)} faces, the largest compared" if faces else
                                                "no face found, the whole photo compared"))
                crops.append(faces[0] if faces else FaceCrop((0, 0, im.width, im.height), None, None, im))
            ea, eb = self.embed_faces(crops)
        score = float(ea @ eb)
        if threshold is None and t is not None:
            notes.append(calibration_mismatch(self.meta, self.settings))
        return Verification(score, None if t is None else bool(score >= np.float32(t)), t, source,
                            "; ".join(n for n in notes if n) or None)

    def verify_pairs(self, pairs, *, root: str | Path | None = None, threshold: float | None = None,
                     far: float | None = None, progress: bool = False) -> PairsReport:
        """Score every pair of a pairs file (LFW ``pairs.txt`` / ``pairsDev*.txt`` or ``path_a path_b
        [label]`` lines): metrics with labels, decisions at the threshold."""
        from facefuse.verification.scoring import verify_pairs

        r = verify_pairs(pairs, self.embedder, self.settings, root=root, threshold=threshold, far=far,
                         progress=progress, model_name=self.path.name)
        return PairsReport(r.summary(), r)

    def calibrate(self, source, *, fars=None, impostors: int | None = None, seed: int = 0,
                  root: str | Path | None = None, write: bool = True, progress: bool = False) -> Calibration:
        """Thresholds at target false accept rates from labelled pairs or a folder of identities; with
        ``write`` they are stored in the model file (and used by later verifies and searches)."""
        from facefuse.verification.calibrate import DEFAULT_IMPOSTORS, calibrate

        rec = calibrate(source, self.path, self.embedder, self.settings, fars=fars,
                        impostors=DEFAULT_IMPOSTORS if impostors is None else impostors, seed=seed, root=root,
                        progress=progress, write=write)
        if write:
            self.embedder.meta.thresholds = rec
        return Calibration(rec["at_far"], rec["best_accuracy"], rec["provenance"], rec)


def load_model(path: str | Path, settings: EmbedSettings | None = None, *, device: str | None = None,
               **changes) -> Model:
    """A model from an exported ``.onnx`` file or a checkpoint / run folder, embedding under
    ``settings`` with ``changes`` (``flip=True``, ``align="landmarks"``, ...). ``align="auto"`` is
    what the model's training faces need (``core.settings.resolve_align``: landmarks for a model
    trained on template crops, which the model's metadata records)."""
    return Model(path, (settings or EmbedSettings()).replace(**changes), device=device)


def _as_pil(image):
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and (
            image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (3, 4))):
        return Image.fromarray(image).convert("RGB")
    if isinstance(image, (str, Path)):
        from facefuse.core.images import open_rgb

        return open_rgb(image)
    what = f"array {image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
    raise ParameterError("images", what, "expected file paths, PIL images or uint8 H x W (x 3) arrays")


def _embed_in_memory(embedder, images: list, settings: EmbedSettings) -> np.ndarray:
    import torch

    transform = embedder.transform(settings)
    rows = []
    for lo in range(0, len(images), settings.batch_size):
        x = torch.stack([transform(im) for im in images[lo:lo + settings.batch_size]])
        rows.append(embedder.embed_tensor(x, flip=settings.flip))
    return np.concatenate(rows)


def _model(model) -> Model:
    return model if isinstance(model, Model) else load_model(model)


# ---------------------------------------------------------------- galleries


class Gallery:
    """A gallery folder (:mod:`facefuse.index`): enrol, search, inspect. The model defaults to the
    one the gallery was built with; the settings are the gallery's own, so every add and search
    embeds as its rows were made."""

    def __init__(self, folder: str | Path, model: Model | str | Path | None = None):
        from facefuse.index.gallery import read_meta

        self.folder = Path(folder)
        read_meta(self.folder)  # a missing or foreign folder is refused here
        self._model = None if model is None else _model(model)
        self._snap, self._snap_key, self._snap_lock = None, None, threading.Lock()
        self.workers: int | None = None     # image-decoding workers for adds and searches (None: automatic)
        self.batch_size: int | None = None  # images per model run (None: the settings' own)

    @property
    def model(self) -> Model:
        """The model given, else the one the gallery was built with (loaded on first use)."""
        if self._model is None:
            from facefuse.index.enroll import index_model_path

            self._model = load_model(index_model_path(self.folder))
        return self._model

    def info(self) -> Enrolment:
        """What the gallery holds now (read from the cached :meth:`snapshot`)."""
        return _enrolment(self.folder, self.snapshot(), 0, 0)

    def __len__(self) -> int:
        from facefuse.index.gallery import read_meta

        return int(read_meta(self.folder)["count"])

    def identities(self) -> list[str]:
        """Distinct enrolled identities, first-enrolled first."""
        return self.snapshot().names()

    def add(self, images, *, identity: str | None = None) -> Enrolment:
        """Enrol image files or gallery-layout folders (identity from folder / ``<identity>_`` file
        names, or ``identity`` for all of them)."""
        from facefuse.index.enroll import add_to_index_folder

        g, added = add_to_index_folder(self.folder, _listed(images), self.model.embedder, identity=identity,
                                       batch_size=self.batch_size, workers=self.workers)
        return _enrolment(self.folder, g, added, 0)

    def add_embeddings(self, embeddings, labels=None) -> Enrolment:
        """Enrol precomputed embeddings (``.npy``, a folder of shards with ``labels``, or a
        ``facefuse embed`` folder, which carries its labels)."""
        from facefuse.index.enroll import add_embeddings_to_index_folder

        g, added = add_embeddings_to_index_folder(self.folder, embeddings, labels)
        return _enrolment(self.folder, g, added, 0)

    @property
    def settings(self) -> EmbedSettings:
        """How the gallery's rows were embedded (adds and searches embed alike)."""
        from facefuse.index.enroll import gallery_settings
        from facefuse.index.gallery import read_meta

        return gallery_settings(read_meta(self.folder))

    def snapshot(self):
        """The gallery as of now (``index.gallery.Gallery``), loaded again only when a write has
        changed the folder since the last call: a resident process searches without re-reading."""
        from facefuse.index.gallery import load_gallery, read_meta

        with self._snap_lock:  # threads of one process: one reload, and never an older snapshot after a newer
            meta = read_meta(self.folder)
            key = tuple(meta.get(k) for k in ("generation", "count", "journal_rows", "removed"))
            if self._snap_key != key:
                m = self._model  # checked against the model in use, once one is
                self._snap = load_gallery(self.folder, fingerprint=m and m.fingerprint, dim=m and m.dim)
                self._snap_key = key
            return self._snap

    def search_vectors(self, vectors, *, top_k: int = 5, threshold: float | None = None, far: float | None = None,
                       nprobe: int | None = None, ef_search: int | None = None) -> list[dict]:
        """Top-``top_k`` identities of each embedding (rows made as the gallery's own): the dicts of
        ``index.gallery.search_gallery`` with the ``threshold`` decided at."""
        from facefuse.index.gallery import search_gallery
        from facefuse.verification.thresholds import resolve_threshold

        m = self.model  # loaded before the snapshot, which is then checked against it
        t, _ = resolve_threshold(m.meta, threshold, far, m.path.name)
        if len(vectors) == 0:
            return []
        hits = search_gallery(self.snapshot(), np.asarray(vectors, np.float32), top_k, t, nprobe=nprobe,
                              ef_search=ef_search)
        return [{**h, "threshold": t} for h in hits]

    def search_photo(self, image, *, align: str | None = None, top_k: int = 5, threshold: float | None = None,
                     far: float | None = None) -> PhotoSearch:
        """Identify every face of one photo as taken (a path, PIL image or array): faces found and
        brought to the template by ``align`` (default: the gallery's own setting), each searched."""
        im = _as_pil(image)
        model = self.model.with_settings(**{**self.settings.vectors(), "center": False,
                                            **({"align": align} if align else {})})
        from facefuse.verification.thresholds import calibration_mismatch

        faces = model.faces(im)
        hits = self.search_vectors(model.embed_faces(faces), top_k=top_k, threshold=threshold, far=far)
        results = [FaceResult(f.to_dict()["box"], f.score, f.landmarks, h["identity"], h["score"],
                              [Match(**m) for m in h["matches"]], h["threshold"]) for f, h in zip(faces, hits)]
        stored = threshold is None and bool((model.meta.thresholds or {}).get("at_far"))
        notes = ([] if faces else ["no face found"]) + (
            [calibration_mismatch(model.meta, model.settings)] if stored else [])
        return PhotoSearch(results, im.width, im.height, "; ".join(n for n in notes if n) or None)

    def add_vectors(self, vectors, identities: list[str], paths: list[str]) -> Enrolment:
        """Enrol embeddings made as the gallery's own rows (e.g. by ``model.embed_faces``), one
        identity and one source path (or any label of where the face came from) per row; durable
        when this returns, and only these rows are written."""
        from facefuse.index.gallery import update_gallery

        m = self.model
        with update_gallery(self.folder, fingerprint=m.fingerprint, dim=m.dim) as g:  # journals only these rows
            g.add(np.asarray(vectors, np.float32), list(identities), [str(p) for p in paths])
        return _enrolment(self.folder, g, len(vectors), 0)

    def search(self, images, *, top_k: int = 5, threshold: float | None = None, far: float | None = None,
               nprobe: int | None = None, ef_search: int | None = None, align: str | None = None
               ) -> list[SearchResult]:
        """The ``top_k`` nearest identities of each query image (folders expanded); ``unknown`` below
        ``threshold``, else the model's calibrated threshold (at ``far``). Queries are embedded as
        the gallery's rows were, or brought to the template by ``align``. With landmark alignment
        each photo is searched face by face: the result is its largest face's, and ``faces`` lists
        every face found (``note`` says when there was none or several)."""
        from facefuse.core.settings import resolve_align
        from facefuse.index.enroll import expand_images, search_images

        align = resolve_align(align, self.model.meta.alignment) if align else None
        if (align or self.settings.align) != "landmarks":
            hits = search_images(_listed(images), self.folder, self.model.embedder, top_k=top_k,
                                 threshold=threshold, far=far, nprobe=nprobe, ef_search=ef_search,
                                 batch_size=self.batch_size, workers=self.workers, align=align)
            return [SearchResult.from_dict(h) for h in hits]
        out = []
        for path in expand_images(_listed(images)):
            photo = self.search_photo(path, align="landmarks", top_k=top_k, threshold=threshold, far=far)
            first = photo.faces[0] if photo.faces else None
            note = photo.note or (f"{len(photo.faces)} faces; the largest is the answer" if len(photo.faces) > 1
                                  else None)
            out.append(SearchResult(str(path), first.identity if first else "unknown", first.score if first else None,
                                    first.matches if first else [], first.threshold if first else None, note,
                                    photo.faces))
        return out


    def remove(self, *, identity: str | None = None, image: str | Path | None = None) -> int:
        """Forget ``identity`` (every row of it) or the rows enrolled from ``image`` (both: that
        identity's rows from that image). Gone from searches when this returns; gone from the files
        on disk at the next compaction (:meth:`compact`, or automatic past
        ``index.store.AUTO_COMPACT_ROWS`` pending rows). Returns the rows removed."""
        from facefuse.index.gallery import remove_from_gallery

        return remove_from_gallery(self.folder, identity=identity, path=image)

    def compact(self) -> dict:
        """Fold the journal of adds and removes into a new index generation: removed faces leave
        the files. Returns what it did (rows, folded, dropped, bytes before and after, seconds)."""
        from facefuse.index.gallery import compact_gallery

        return compact_gallery(self.folder)


def build_gallery(source, out: str | Path, model: Model | str | Path | None = None, *, labels=None,
                  kind: str = "auto", **params) -> tuple[Gallery, Enrolment]:
    """Enrol ``source`` into a new gallery folder ``out``: a folder of identities (one sub-folder
    per identity, or ``<identity>_*.jpg`` files) embedded by ``model`` under its settings, or
    precomputed embeddings (``labels``, or a ``facefuse embed`` folder, which carries them; ``model``
    then only recorded). ``kind``: ``auto`` or an index kind of :data:`facefuse.index.search.KINDS`;
    ``params``: its build and search parameters (``nlist``, ``nprobe``, ...)."""
    from facefuse.index.enroll import (build_index_folder, build_index_folder_from_embeddings, model_record)

    m = None if model is None else _model(model)
    if labels is not None or _is_embeddings(source):
        record = model_record(m.embedder, m.path) if m is not None else None
        g, skipped = build_index_folder_from_embeddings(source, labels, out, model=record, kind=kind, **params), 0
    else:
        if m is None:
            raise ParameterError("model", None, "a model is needed to embed the images of a gallery folder")
        g, skipped = build_index_folder(source, m.embedder, m.path, out, m.settings, kind=kind, **params)
    return Gallery(out, m), _enrolment(out, g, len(g), skipped)


def open_gallery(folder: str | Path, model: Model | str | Path | None = None) -> Gallery:
    """An existing gallery folder (``model``: default the one it was built with)."""
    return Gallery(folder, model)


def _is_embeddings(source) -> bool:
    from facefuse.export.extract import MANIFEST

    p = Path(source)
    return p.suffix == ".npy" or (p / MANIFEST).is_file()


def _listed(images) -> list:
    return list(images) if isinstance(images, (list, tuple)) else [images]


def _enrolment(folder, g, added: int, skipped: int) -> Enrolment:
    return Enrolment(str(folder), added, skipped, len(g), len(g.names()), g.kind, g.dim)


# ---------------------------------------------------------------- the other jobs


def embed_to_folder(source, model: str | Path, out: str | Path, settings: EmbedSettings | None = None, **changes):
    """Embed a folder of identities or a list file into ``out`` (shards, labels, paths, manifest);
    under torchrun each process embeds its part. Returns ``export.extract.Extraction``."""
    from facefuse.export.extract import extract_embeddings

    return extract_embeddings(source, model, out, (settings or EmbedSettings()).replace(**changes))


def align_folder(src, out, **options):
    """Raw photos in identity folders -> trainable template crops, with a manifest
    (``facefuse.align.folder.align_folder``)."""
    from facefuse.align import folder

    return folder.align_folder(src, out, **options)


def fetch_lfw(folder: str | Path, **options):
    """Download, check, unpack and align the public LFW release into ``folder`` (the layout
    ``train`` and ``verify`` read; ``FACEFUSE_DATA=folder``): ``datasets.lfw.fetch_lfw``."""
    from facefuse.datasets import lfw

    return lfw.fetch_lfw(folder, **options)


def export_onnx(checkpoint: str | Path, out: str | Path, **options):
    """Export a checkpoint to ONNX and check it against PyTorch (``export.onnx_export.export_onnx``)."""
    from facefuse.export import onnx_export

    return onnx_export.export_onnx(checkpoint, out, **options)


def quantize_int8(onnx_in: str | Path, out: str | Path, calib_images: str | Path, **options):
    """An INT8 copy of a float32 export, calibrated on face images (``export.quantize.quantize_int8``)."""
    from facefuse.export import quantize

    return quantize.quantize_int8(onnx_in, out, calib_images, **options)


def train(config, *, resume: bool = False, progress: bool = True) -> dict:
    """Train from a :class:`facefuse.trainer.config.TrainConfig` (``trainer.config.resolve_config``
    builds one from files and overrides). Returns the run's summary."""
    from facefuse.trainer.engine import train as run_training

    return run_training(config, resume=resume, progress=progress)
