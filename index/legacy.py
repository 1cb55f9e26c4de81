"""Gallery folders of format version 1, written before :mod:`index.store`: ``meta.json`` (every
row's identity and path, the model, kind and parameters, ``index_file``) naming
``index-<G>.faiss``, the previous generation kept for readers, ``index.faiss`` a link.

They are read as they are (:func:`read`: no lock, nothing written) and upgraded in place by their
first write (:func:`upgrade`, under the writer lock): ``gallery.db`` is made in one transaction
that takes ``index-<G>.faiss`` as generation ``G`` unchanged (row ids = row numbers), then
``meta.json`` and the older generation are deleted. Until that commit the folder is version 1, after
it ``gallery.db`` wins (a ``meta.json`` left by a crash in between is deleted by the next write).
"""

from __future__ import annotations

import json
import re
import time
from contextlib import closing
from pathlib import Path

import faiss
import numpy as np

from facefuse.core.errors import FacefuseError
from facefuse.index import store


def read_meta(folder: Path) -> dict | None:
    """``meta.json`` of a version-1 folder, checked to be one; ``None`` if the folder has none."""
    path = folder / store.LEGACY_META
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise FacefuseError(f"{path}: not valid JSON; {store.REBUILD}") from None
    if not isinstance(meta, dict) or meta.get("format") != store.FORMAT:
        raise FacefuseError(f"{path}: not a facefuse gallery meta file")
    return meta


def header_of(meta: dict) -> dict:
    """A version-1 ``meta.json`` as a version-2 header (what ``gallery.read_meta`` returns of it)."""
    keep = ("kind", "dim", "model", "params", "count", "index_file", "generation")
    return {"format": store.FORMAT, "version": 1, "settings": {}, "removed": 0, "journal_rows": 0,
            **{k: meta[k] for k in keep if k in meta}}


def read(folder: Path) -> store.Snapshot:
    """A consistent snapshot of a version-1 folder (its writers replaced ``meta.json`` atomically
    and kept the previous generation: a reader that loses the race reads again)."""
    for _ in range(store.READ_RETRIES):
        meta = read_meta(folder)
        if meta is None:  # upgraded meanwhile
            return store.read_snapshot(folder)
        index, problem = _index(folder, meta)
        if index is not None:
            n = index.ntotal
            return store.Snapshot(header_of(meta), np.arange(n, dtype=np.int64), list(meta["identities"]),
                                  list(meta["paths"]), np.zeros(n, bool), index)
        now = read_meta(folder) or {}
        if (now.get("index_file"), now.get("generation")) == (meta.get("index_file"), meta.get("generation")):
            raise FacefuseError(problem)
    raise FacefuseError(f"{folder}: changed {store.READ_RETRIES} times while being read; try again")


def _index(folder: Path, meta: dict) -> tuple[faiss.Index | None, str | None]:
    path = folder / meta.get("index_file", store.INDEX_LINK)
    try:
        index = faiss.read_index(str(path))
    except RuntimeError:
        why = "is missing" if not path.exists() else "not a faiss index file"
        return None, f"{path}: {why}; {store.REBUILD}"
    ids, paths = meta.get("identities") or [], meta.get("paths") or []
    if not (index.ntotal == meta.get("count") == len(ids) == len(paths)):
        return None, (f"{folder}: {path.name} holds {index.ntotal} vectors but {store.LEGACY_META} lists "
                      f"{len(ids)} (count {meta.get('count')}, {len(paths)} paths); {store.REBUILD}")
    if meta.get("dim") != index.d:
        return None, (f"{folder}: {path.name} holds {index.d}-d vectors but {store.LEGACY_META} says "
                      f"{meta.get('dim')}-d; {store.REBUILD}")
    return index, None


def upgrade(folder: Path) -> bool:
    """Upgrade a version-1 folder in place (caller holds the lock); ``False`` if it is not one
    (a version-2 folder, or one whose upgrade committed before a crash left ``meta.json``)."""
    if not (folder / store.LEGACY_META).is_file() or store.read_header(folder) is not None:
        return False
    meta = read_meta(folder)
    index, problem = _index(folder, meta)
    if index is None:
        raise FacefuseError(problem)
    store.step("begin")
    m = re.match(r"index-(\d+)\.faiss$", meta.get("index_file", ""))
    gen = int(m.group(1)) if m else max(store.generations(folder), default=0) + 1
    if not m:  # the oldest folders name index.faiss itself: give it a generation name first
        store.write_index(folder, index, gen)
    n, now = index.ntotal, time.time()
    with closing(store.connect(folder, create=True)) as con:
        con.execute("BEGIN IMMEDIATE")
        if store.header(con) is None:
            store.create_schema(con)
        con.executemany("INSERT INTO rows (id, identity, path, added_at) VALUES (?, ?, ?, ?)",
                        zip(range(n), meta["identities"], meta["paths"], [now] * n))
        store.set_values(con, format=store.FORMAT, version=store.VERSION, kind=meta["kind"], dim=meta["dim"],
                         model=meta.get("model", {}), params=meta.get("params", {}), settings={}, generation=gen,
                         index_rows=n, journal_first_id=n, journal_rows=0, next_id=n, count=n, removed=0)
        store.step("db-written")
        con.execute("COMMIT")
    store.step("committed")
    store.fsync_path(folder)
    store.tidy(folder, gen)
    return True
