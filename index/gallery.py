"""An enrolled gallery on disk: a folder holding ``index.faiss`` and ``meta.json``.

``meta.json`` records, for every vector in row order, its identity and image path, plus the model
the embeddings came from (fingerprint, dimension, backbone), the index kind and the count. The
folder is always written to a temporary sibling first and renamed into place, so an interrupted
build or add never leaves a half-written gallery. Loading refuses a gallery built with a different
model (fingerprint or dimension), because its vectors are not comparable with the new embeddings.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np

from facefuse.index import search as S
from facefuse.core.errors import FacefuseError
from facefuse.core.images import is_image

INDEX_FILE = "index.faiss"
META_FILE = "meta.json"
FORMAT = "facefuse-gallery"


@dataclass
class Gallery:
    """A faiss index and, per row, the identity and image path it was enrolled from."""

    index: faiss.Index
    identities: list[str]
    paths: list[str]
    model: dict                       # fingerprint, embedding_dim, backbone of the embedding model
    kind: str
    params: dict = field(default_factory=dict)  # build parameters (nlist, hnsw_m, ...)

    def __len__(self) -> int:
        return self.index.ntotal

    @property
    def dim(self) -> int:
        return self.index.d

    def names(self) -> list[str]:
        """Distinct identities in first-enrolled order."""
        return list(dict.fromkeys(self.identities))

    def label_ids(self) -> tuple[np.ndarray, list[str]]:
        """Per-row integer identity ids and the names they index."""
        names = self.names()
        pos = {n: i for i, n in enumerate(names)}
        return np.array([pos[n] for n in self.identities], dtype=np.int64), names

    def add(self, embeddings, identities: list[str], paths: list[str]) -> None:
        """Enroll more vectors into the existing (already trained) index: no rebuild."""
        x = S.normalize(embeddings)
        if x.shape[1] != self.dim:
            raise FacefuseError(f"embeddings have dimension {x.shape[1]}, the gallery {self.dim}")
        if not (len(identities) == len(paths) == x.shape[0]):
            raise ValueError("one identity and one path per embedding")
        self.index.add(x)
        self.identities += list(identities)
        self.paths += [str(p) for p in paths]

    def to_meta(self) -> dict:
        return {"format": FORMAT, "kind": self.kind, "count": len(self), "dim": self.dim,
                "model": self.model, "params": self.params,
                "identities": self.identities, "paths": self.paths}


def build_gallery(embeddings, identities: list[str], paths: list[str], model: dict,
                  kind: str = "flat", **params) -> Gallery:
    """Index ``embeddings`` (normalised here) of ``kind``; ``params`` go to :func:`search.build_index`."""
    if len(identities) == 0 or len(embeddings) == 0:
        raise FacefuseError("the gallery is empty: no images to enroll")
    x = S.as_float32(embeddings)
    if not (len(identities) == len(paths) == x.shape[0]):
        raise ValueError("one identity and one path per embedding")
    try:
        index = S.build_index(S.normalize(x), kind, **params)
    except ValueError as exc:
        raise FacefuseError(str(exc)) from None
    if kind == "ivf":
        params = {**params, "nlist": faiss.downcast_index(index).nlist}
    return Gallery(index, list(identities), [str(p) for p in paths], dict(model), kind, params)


def search_gallery(gallery: Gallery, queries, k: int = 5, threshold: float | None = None,
                   **params) -> list[dict]:
    """Top-``k`` distinct identities per query (``queries`` normalised here).

    Each result: ``{"identity", "score", "matches": [{"identity", "score", "path"}, ...]}`` where
    ``identity`` is the best match, or ``"unknown"`` when its cosine score is below ``threshold``.
    """
    if len(gallery) == 0:
        raise FacefuseError("the gallery is empty")
    ids, names = gallery.label_ids()
    k = max(1, min(k, len(names)))
    scores, labels, rows = S.search_identities(gallery.index, S.normalize(queries), ids, k, **params)
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


def save_gallery(gallery: Gallery, folder: str | Path) -> None:
    """Write ``folder`` atomically: a temporary sibling folder is filled, then renamed into place
    (an existing gallery folder is replaced; any other existing folder is refused)."""
    folder = Path(folder)
    if folder.exists() and not _is_gallery_folder(folder):
        raise FacefuseError(f"{folder}: exists and is not a gallery index folder; choose another -o")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
    try:
        faiss.write_index(gallery.index, str(tmp / INDEX_FILE))
        (tmp / META_FILE).write_text(json.dumps(gallery.to_meta(), indent=1))
        for name in (INDEX_FILE, META_FILE):
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
        old = None
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            os.rename(folder, old)
        os.rename(tmp, folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _is_gallery_folder(folder: Path) -> bool:
    return folder.is_dir() and (folder / META_FILE).is_file() and (
        set(p.name for p in folder.iterdir()) <= {INDEX_FILE, META_FILE})


def read_meta(folder: str | Path) -> dict:
    """``meta.json`` of a gallery index folder, checked to be one."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FacefuseError(f"{folder}: no such gallery index folder")
    meta_path = folder / META_FILE
    if not meta_path.is_file() or not (folder / INDEX_FILE).is_file():
        raise FacefuseError(f"{folder}: not a gallery index (needs {INDEX_FILE} and {META_FILE})")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise FacefuseError(f"{meta_path}: not valid JSON") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise FacefuseError(f"{meta_path}: not a facefuse gallery meta file")
    return meta


def load_gallery(folder: str | Path, *, fingerprint: str | None = None,
                 dim: int | None = None) -> Gallery:
    """Read a gallery folder; with ``fingerprint`` / ``dim``, refuse one built with another model."""
    folder = Path(folder)
    meta = read_meta(folder)
    index_path = folder / INDEX_FILE
    try:
        index = faiss.read_index(str(index_path))
    except RuntimeError:
        raise FacefuseError(f"{index_path}: not a faiss index file") from None
    if not (index.ntotal == meta.get("count") == len(meta.get("identities", [])) == len(meta.get("paths", []))):
        raise FacefuseError(f"{folder}: {INDEX_FILE} holds {index.ntotal} vectors but {META_FILE} "
                            f"lists {len(meta['identities'])}; rebuild the index")
    model = meta.get("model", {})
    if dim is not None and index.d != dim:
        raise FacefuseError(f"{folder}: index holds {index.d}-d embeddings but the model makes {dim}-d ones; "
                            "search with the model the index was built with, or rebuild it")
    if fingerprint is not None and model.get("fingerprint") != fingerprint:
        raise FacefuseError(f"{folder}: index was built with model {model.get('fingerprint')} but this model is "
                            f"{fingerprint}; search with the model the index was built with, or rebuild it")
    return Gallery(index, list(meta["identities"]), list(meta["paths"]), model, meta["kind"],
                   meta.get("params", {}))


# ---------------------------------------------------------------- image folders


def identity_from_name(path: Path) -> str:
    """``<identity>_<anything>.ext`` -> identity, split at the last underscore (so LFW's
    ``George_W_Bush_0001.jpg`` is ``George_W_Bush``); a name without ``_`` is its own identity."""
    stem = path.stem
    return stem.rsplit("_", 1)[0] if "_" in stem else stem


def scan_gallery(folder: str | Path) -> tuple[list[Path], list[str]]:
    """Images and identities of a gallery folder: each sub-folder is one identity (its images, at
    any depth, belong to it); images directly in ``folder`` are named ``<identity>_<anything>``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FacefuseError(f"{folder}: no such gallery folder")
    paths, ids = [], []
    for entry in sorted(folder.iterdir()):
        if entry.is_dir() and not entry.name.startswith("."):
            for p in sorted(entry.rglob("*")):
                if is_image(p):
                    paths.append(p)
                    ids.append(entry.name)
        elif is_image(entry):
            paths.append(entry)
            ids.append(identity_from_name(entry))
    if not paths:
        raise FacefuseError(f"{folder}: the gallery is empty (no images; expected one folder per identity "
                            "or images named <identity>_<anything>.jpg)")
    return paths, ids
