"""An enrolled gallery on disk: a folder holding ``meta.json`` and the faiss index it names.

``meta.json`` records, for every vector in row order, its identity and image path, plus the model
the embeddings came from (fingerprint, dimension, backbone), the index kind, its build and search
parameters, the count, and ``index_file``: the generation of the index it belongs to.

Writes are transactions. A writer holds an exclusive ``fcntl.flock`` on ``<folder>/.lock`` across
its whole read-modify-write (:func:`update_gallery`), so concurrent writers serialise and none is
lost. It writes the new index under a fresh name (``index-<generation>.faiss``), fsyncs it, then
atomically replaces ``meta.json`` naming it: that rename is the one commit point, so the index and
its metadata change together. Readers take no lock: they read ``meta.json`` once and open the index
it names; the previous generation is kept until the next commit, and a reader that still loses the
race (the file it was told of is gone, or does not match) re-reads ``meta.json`` and tries again.
``index.faiss`` is a symbolic link to the current generation, for tools that open it by name.
Loading refuses an index whose vector count disagrees with its metadata, or one built with a
different model (fingerprint or dimension), because its vectors are not comparable with new ones.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np

from facefuse.core.errors import FacefuseError
from facefuse.core.folders import identity_from_name  # noqa: F401  (part of this module's API)
from facefuse.core.folders import scan_identity_folder as scan_gallery  # noqa: F401
from facefuse.core.files import atomic_write_text
from facefuse.index import search as S

INDEX_FILE = "index.faiss"  # link to the current generation
META_FILE = "meta.json"
LOCK_FILE = ".lock"
FORMAT = "facefuse-gallery"
GENERATION = re.compile(r"index-(\d+)\.faiss$")
READ_RETRIES = 20


@dataclass
class Gallery:
    """A faiss index and, per row, the identity and image path it was enrolled from."""

    index: faiss.Index
    identities: list[str]
    paths: list[str]
    model: dict                       # fingerprint, embedding_dim, backbone of the embedding model
    kind: str
    params: dict = field(default_factory=dict)  # build + search parameters (nlist, nprobe, ...), flip_tta
    _labels: tuple | None = field(default=None, repr=False, compare=False)
    _gpu_index: faiss.Index | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return self.index.ntotal

    @property
    def dim(self) -> int:
        return self.index.d

    def names(self) -> list[str]:
        """Distinct identities in first-enrolled order."""
        return self.label_ids()[1]

    def label_ids(self) -> tuple[np.ndarray, list[str]]:
        """Per-row integer identity ids and the names they index (computed once per change)."""
        if self._labels is None:
            names = list(dict.fromkeys(self.identities))
            pos = {n: i for i, n in enumerate(names)}
            self._labels = (np.fromiter((pos[n] for n in self.identities), np.int64, len(self.identities)), names)
        return self._labels

    def search_index(self) -> faiss.Index:
        """What to search: the index, or its GPU copy when faiss sees a GPU and the kind runs there
        (copied once, reused by every search until the gallery changes)."""
        if self._gpu_index is None and faiss.get_num_gpus() > 0 and S.gpu_capable(self.index):
            self._gpu_index = S.to_gpu(self.index)
        return self._gpu_index if self._gpu_index is not None else self.index

    def search_params(self, **overrides) -> dict:
        """The stored search parameters of the kind, with the non-``None`` ``overrides`` applied."""
        p = {k: v for k, v in self.params.items() if k in S.SEARCH_PARAMS}
        p.update({k: v for k, v in overrides.items() if v is not None})
        return p

    def add(self, embeddings, identities: list[str], paths: list[str]) -> None:
        """Enroll more vectors (normalised here, in chunks) into the existing, already trained
        index: no rebuild."""
        if embeddings.ndim != 2 or embeddings.shape[1] != self.dim:
            raise FacefuseError(f"embeddings have dimension {embeddings.shape[-1]}, the gallery {self.dim}")
        if not (len(identities) == len(paths) == len(embeddings)):
            raise ValueError("one identity and one path per embedding")
        for block in S.iter_chunks(embeddings):
            self.index.add(block)
        self.identities += list(identities)
        self.paths += [str(p) for p in paths]
        self._labels = self._gpu_index = None

    def to_meta(self) -> dict:
        return {"format": FORMAT, "kind": self.kind, "count": len(self), "dim": self.dim,
                "model": self.model, "params": self.params,
                "identities": self.identities, "paths": self.paths}


def build_gallery(embeddings, identities: list[str], paths: list[str], model: dict,
                  kind: str = "auto", **params) -> Gallery:
    """Index ``embeddings`` (normalised here; an array or a memory-mapped file) of ``kind``
    (``auto``: :func:`search.auto_kind`). ``params`` are build and search parameters
    (:func:`search.resolve_params`); the resolved ones are kept with the gallery."""
    n = len(embeddings)
    if len(identities) == 0 or n == 0:
        raise FacefuseError("the gallery is empty: no images to enroll")
    if not (len(identities) == len(paths) == n):
        raise ValueError("one identity and one path per embedding")
    d = embeddings.shape[1]
    try:
        kind, resolved = S.resolve_kind(kind, n, d, params)
        index = S.build_index(embeddings, kind, **resolved)
    except ValueError as exc:
        raise FacefuseError(str(exc)) from None
    return Gallery(index, list(identities), [str(p) for p in paths], dict(model), kind, resolved)


def search_gallery(gallery: Gallery, queries, k: int = 5, threshold: float | None = None,
                   **params) -> list[dict]:
    """Top-``k`` distinct identities per query (``queries`` normalised here).

    ``params`` (``nprobe``, ``k_factor``, ``ef_search``) override the gallery's stored ones.
    Each result: ``{"identity", "score", "matches": [{"identity", "score", "path"}, ...]}`` where
    ``identity`` is the best match, or ``"unknown"`` when its cosine score is below ``threshold``.
    """
    if len(gallery) == 0:
        raise FacefuseError("the gallery is empty")
    ids, names = gallery.label_ids()
    k = max(1, min(k, len(names)))
    scores, labels, rows = S.search_identities(gallery.search_index(), S.normalize(queries), ids, k,
                                               **gallery.search_params(**params))
    out = []
    for s, lab, r in zip(scores, labels, rows):
        matches = [{"identity": names[l], "score": float(v), "path": gallery.paths[i]}
                   for v, l, i in zip(s, lab, r) if l >= 0]
        best = matches[0] if matches else None
        known = best is not None and (threshold is None or best["score"] >= threshold)
        out.append({"identity": best["identity"] if known else "unknown",
                    "score": best["score"] if best else None, "matches": matches})
    return out


# ---------------------------------------------------------------- on disk


@contextmanager
def locked(folder: str | Path):
    """Hold the exclusive writer lock of gallery ``folder`` (created if absent) for the block."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield folder
    finally:
        os.close(fd)  # releases the lock


def save_gallery(gallery: Gallery, folder: str | Path) -> None:
    """Write ``gallery`` into ``folder`` as one transaction under the writer lock (an existing
    gallery folder gets a new generation; any other non-empty folder is refused)."""
    folder = Path(folder)
    _check_writable(folder)
    with locked(folder):
        _check_writable(folder)
        _commit(gallery, folder)


@contextmanager
def update_gallery(folder: str | Path, *, fingerprint: str | None = None, dim: int | None = None):
    """Read-modify-write of gallery ``folder`` under the writer lock: yields the current gallery,
    commits it when the block returns (nothing is written if it raises)."""
    folder = Path(folder)
    read_meta(folder)  # a missing / foreign folder is refused before the lock file is made
    with locked(folder):
        gallery = load_gallery(folder, fingerprint=fingerprint, dim=dim)
        yield gallery
        _commit(gallery, folder)


def _check_writable(folder: Path) -> None:
    if folder.exists() and not _is_gallery_folder(folder):
        raise FacefuseError(f"{folder}: exists and is not a gallery index folder; choose another -o")


def _is_gallery_folder(folder: Path) -> bool:
    """A folder holding only gallery files (an empty folder counts)."""
    return folder.is_dir() and all(
        p.name in (INDEX_FILE, META_FILE, LOCK_FILE) or GENERATION.match(p.name) or p.name.startswith(f".{META_FILE}.")
        or p.name.startswith(f".{INDEX_FILE}.") for p in folder.iterdir())


def _generations(folder: Path) -> dict[int, Path]:
    return {int(m.group(1)): p for p in folder.iterdir() if (m := GENERATION.match(p.name))}


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _commit(gallery: Gallery, folder: Path) -> None:
    """The new generation's index file, then ``meta.json`` naming it (the commit), then the link;
    generations older than the previous one are deleted. Caller holds the lock."""
    gens = _generations(folder)
    gen = max(gens, default=0) + 1
    name = f"index-{gen:06d}.faiss"
    try:
        previous = json.loads((folder / META_FILE).read_text()).get("index_file", INDEX_FILE)
    except (OSError, ValueError, AttributeError):
        previous = None
    try:
        faiss.write_index(gallery.index, str(folder / name))
        _fsync(folder / name)
        atomic_write_text(folder / META_FILE, json.dumps({**gallery.to_meta(), "index_file": name,
                                                          "generation": gen}, indent=1))
    except BaseException:
        (folder / name).unlink(missing_ok=True)
        raise
    _fsync(folder)
    link = folder / f".{INDEX_FILE}.{os.getpid()}.tmp"
    link.unlink(missing_ok=True)
    os.symlink(name, link)
    os.replace(link, folder / INDEX_FILE)
    for g, p in gens.items():
        if p.name != previous:
            p.unlink(missing_ok=True)


def read_meta(folder: str | Path) -> dict:
    """``meta.json`` of a gallery index folder, checked to be one."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FacefuseError(f"{folder}: no such gallery index folder")
    meta_path = folder / META_FILE
    if not meta_path.is_file():
        raise FacefuseError(f"{folder}: not a gallery index (needs {META_FILE} and its index file)")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise FacefuseError(f"{meta_path}: not valid JSON") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise FacefuseError(f"{meta_path}: not a facefuse gallery meta file")
    return meta


def check_model(meta: dict, folder: Path, *, fingerprint: str | None = None, dim: int | None = None) -> None:
    """Refuse a gallery whose vectors another model made (a gallery built from embeddings without
    a model records no fingerprint: then only the dimension is checked)."""
    model = meta.get("model", {})
    if dim is not None and meta.get("dim") != dim:
        raise FacefuseError(f"{folder}: index holds {meta.get('dim')}-d embeddings but the model makes {dim}-d "
                            "ones; search with the model the index was built with, or rebuild it")
    if fingerprint is not None and model.get("fingerprint") not in (None, fingerprint):
        raise FacefuseError(f"{folder}: index was built with model {model.get('fingerprint')} but this model is "
                            f"{fingerprint}; search with the model the index was built with, or rebuild it")


def load_gallery(folder: str | Path, *, fingerprint: str | None = None,
                 dim: int | None = None) -> Gallery:
    """Read a gallery folder (a consistent generation, without taking the lock); with
    ``fingerprint`` / ``dim``, refuse one built with another model."""
    folder = Path(folder)
    for _ in range(READ_RETRIES):
        meta = read_meta(folder)
        index, problem = _read_index(folder, meta)
        if problem is None:
            break
        if _same_generation(meta, folder):
            raise FacefuseError(problem)
    else:
        raise FacefuseError(f"{folder}: changed {READ_RETRIES} times while being read; try again")
    check_model(meta, folder, fingerprint=fingerprint, dim=dim)
    return Gallery(index, list(meta["identities"]), list(meta["paths"]), meta.get("model", {}), meta["kind"],
                   meta.get("params", {}))


def _read_index(folder: Path, meta: dict):
    """``(index, None)``, or ``(None, why not)`` when the file is unreadable or disagrees with ``meta``."""
    index_path = folder / meta.get("index_file", INDEX_FILE)
    try:
        index = faiss.read_index(str(index_path))
    except RuntimeError:
        why = "is missing" if not index_path.exists() else "not a faiss index file"
        return None, f"{index_path}: {why}"
    ids, paths = meta.get("identities") or [], meta.get("paths") or []
    if not (index.ntotal == meta.get("count") == len(ids) == len(paths)):
        return None, (f"{folder}: {index_path.name} holds {index.ntotal} vectors but {META_FILE} lists {len(ids)} "
                      f"(count {meta.get('count')}, {len(paths)} paths); rebuild the index")
    if meta.get("dim") != index.d:
        return None, (f"{folder}: {index_path.name} holds {index.d}-d vectors but {META_FILE} says "
                      f"{meta.get('dim')}-d; rebuild the index")
    return index, None


def _same_generation(meta: dict, folder: Path) -> bool:
    """Whether ``meta.json`` still names what ``meta`` named (so a failed read is not a race)."""
    try:
        now = read_meta(folder)
    except FacefuseError:
        return True
    return (now.get("index_file"), now.get("generation")) == (meta.get("index_file"), meta.get("generation"))
