"""An enrolled gallery: a faiss index and, per vector, the identity and image path it came from;
in memory (:class:`Gallery`) and as a folder on disk that changes by what is added or removed.

The folder (layout, commit points, crash and upgrade story: :mod:`index.store`) keeps identities,
paths, provenance and per-row state in SQLite and the vectors in a faiss index plus an append-only
journal. Writers serialise on one ``fcntl.flock`` (``<folder>/.lock``, :func:`locked`); readers take
no lock and get a consistent snapshot (:func:`load_gallery`). Every write is durable when it returns.

- :func:`save_gallery`: a whole gallery, as a new generation (``index build``).
- :func:`update_gallery` / :func:`add_to_gallery`: journal new rows only (``index add``).
- :func:`remove_from_gallery`: rows of an identity or an image path leave search results at once;
  their vectors, identities and paths leave the disk at the next compaction.
- :func:`compact_gallery`: fold the journal into a new index generation, dropping removed rows. It
  also runs by itself at the end of a write that leaves :data:`store.AUTO_COMPACT_ROWS` rows pending.

Folders written before this format (``meta.json``) are read as they are and upgraded in place, under
the lock, by their first write. Loading refuses a gallery whose vectors another model made.
"""

from __future__ import annotations

from contextlib import closing, contextmanager
from pathlib import Path

import faiss
import numpy as np

from facefuse.core.errors import FacefuseError, ParameterError
from facefuse.core.folders import identity_from_name  # noqa: F401  (part of this module's API)
from facefuse.core.folders import scan_identity_folder as scan_gallery  # noqa: F401
from facefuse.index import legacy, store
from facefuse.index import search as S
from facefuse.index.store import DB_FILE, locked  # noqa: F401  (part of this module's API)

INDEX_FILE = store.INDEX_LINK  # link to the current generation's index file
META_FILE = store.LEGACY_META  # the metadata file of format version 1
FORMAT = store.FORMAT


class Gallery:
    """A faiss index and, per index position, the identity and image path enrolled there.

    A gallery read from a folder may hold rows removed since the folder's last compaction: they
    stay in the index, masked. ``identities``, ``paths``, ``names()`` and ``len`` count live rows
    only; ``label_ids()`` (per position) gives removed rows ``-1`` and search never returns them.
    ``row_ids`` are the rows' stable ids in the folder (positions for a gallery built in memory).
    The gallery :func:`update_gallery` yields reads its index only if the block asks for it.
    """

    def __init__(self, index: faiss.Index | None, identities: list[str], paths: list[str], model: dict, kind: str,
                 params: dict | None = None, settings: dict | None = None, *, removed: np.ndarray | None = None,
                 row_ids: np.ndarray | None = None):
        self._index, self._ids, self._paths = index, list(identities), [str(p) for p in paths]
        self.model, self.kind = model, kind
        self.params = dict(params or {})      # build + search parameters (nlist, nprobe, ...)
        self.settings = dict(settings or {})  # how the images were embedded, stored as given
        n = len(self._ids)
        self.removed = np.zeros(n, bool) if removed is None else np.asarray(removed, bool)
        self.row_ids = np.arange(n, dtype=np.int64) if row_ids is None else np.asarray(row_ids, np.int64)
        self.pending: list[tuple[np.ndarray, list[str], list[str]]] = []  # adds a folder commit journals
        self._folder: Path | None = None  # set by update_gallery until it commits: where the adds go
        self._source: Path | None = None  # the folder the index and rows are read from on first use
        self._header: dict | None = None  # that folder's header, while they are not read
        self._labels = self._gpu_index = self._live = None

    @classmethod
    def _of_folder(cls, folder: Path, header: dict) -> Gallery:
        """The gallery of ``folder`` (lock held) with its index and rows read on first use."""
        g = cls(None, [], [], header.get("model", {}), header["kind"], header.get("params"), header.get("settings"))
        g._folder = g._source = folder
        g._header = header
        return g

    def _read(self) -> None:
        if self._header is None:
            return
        snap = store.read_snapshot(self._source)
        self._index, self._ids, self._paths = snap.index, snap.identities, snap.paths
        self.removed, self.row_ids, self._header = snap.removed, snap.ids, None
        for vectors, ids, paths in self.pending:
            self._append(vectors, ids, paths)

    @property
    def index(self) -> faiss.Index:
        self._read()
        return self._index

    @property
    def identities(self) -> list[str]:
        """Identity of every live row, in enrolment order."""
        return self._live_rows()[0]

    @property
    def paths(self) -> list[str]:
        """Image path of every live row, in enrolment order."""
        return self._live_rows()[1]

    def _live_rows(self) -> tuple[list[str], list[str]]:
        self._read()
        if not self.removed.any():
            return self._ids, self._paths
        if self._live is None:
            keep = np.flatnonzero(~self.removed)
            self._live = ([self._ids[i] for i in keep], [self._paths[i] for i in keep])
        return self._live

    def __len__(self) -> int:
        if self._header is not None:
            return self._header["count"] + sum(len(p[0]) for p in self.pending)
        return len(self._ids) - int(np.count_nonzero(self.removed))

    @property
    def dim(self) -> int:
        return self._header["dim"] if self._header is not None else self._index.d

    def names(self) -> list[str]:
        """Distinct live identities in first-enrolled order."""
        if self._header is not None:
            with closing(store.connect(self._source)) as con:
                names = [r[0] for r in con.execute("SELECT identity FROM rows WHERE removed = 0 "
                                                   "GROUP BY identity ORDER BY min(id)")]
            return list(dict.fromkeys(names + [i for p in self.pending for i in p[1]]))
        return self.label_ids()[1]

    def label_ids(self) -> tuple[np.ndarray, list[str]]:
        """Per index position the integer id of its identity (``-1`` for a removed row) and the names
        they index (computed once per change)."""
        self._read()
        if self._labels is None:
            names = list(dict.fromkeys(self.identities))
            pos = {n: i for i, n in enumerate(names)}
            labels = np.fromiter((pos.get(n, -1) for n in self._ids), np.int64, len(self._ids))
            labels[self.removed] = -1
            self._labels = (labels, names)
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
        index: no rebuild. In :func:`update_gallery` they are journalled when the block ends."""
        if embeddings.ndim != 2 or embeddings.shape[1] != self.dim:
            raise FacefuseError(f"embeddings have dimension {embeddings.shape[-1]}, the gallery {self.dim}")
        if not (len(identities) == len(paths) == len(embeddings)):
            raise ValueError("one identity and one path per embedding")
        ids, paths = list(identities), [str(p) for p in paths]
        if self._folder is None:
            self._read()  # a folder's gallery after its update_gallery block: adds go to memory only
        at = 0
        for block in S.iter_chunks(embeddings):
            part = (block, ids[at:at + len(block)], paths[at:at + len(block)])
            at += len(block)
            if self._folder is not None:
                self.pending.append(part)
            if self._header is None:
                self._append(*part)

    def _append(self, vectors: np.ndarray, ids: list[str], paths: list[str]) -> None:
        self._index.add(vectors)
        self._ids += ids
        self._paths += paths
        self.removed = np.r_[self.removed, np.zeros(len(ids), bool)]
        self.row_ids = np.r_[self.row_ids, -np.ones(len(ids), np.int64)]  # given by the folder's commit
        self._labels = self._gpu_index = self._live = None

    def remove(self, *, identity: str | None = None, path: str | None = None) -> int:
        """Mask the live rows of ``identity`` and/or ``path`` in memory (e.g. to follow a
        :func:`remove_from_gallery` without reading the folder again); returns how many."""
        if self._folder is not None:
            raise FacefuseError(f"{self._folder}: remove rows of a gallery folder with remove_from_gallery")
        self._read()
        hit = ~self.removed
        if identity is not None:
            hit &= np.fromiter((i == identity for i in self._ids), bool, len(self._ids))
        if path is not None:
            hit &= np.fromiter((p == str(path) for p in self._paths), bool, len(self._paths))
        self.removed = self.removed | hit
        self._labels = self._live = None
        return int(hit.sum())

    def header(self) -> dict:
        """What a folder stores of the gallery besides its rows."""
        return {"kind": self.kind, "dim": self.dim, "model": self.model, "params": self.params,
                "settings": self.settings}


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
    Removed rows all carry label -1, so they fill at most one of ``k + 1`` identities asked of the
    index, and that one is dropped.
    """
    if len(gallery) == 0:
        raise FacefuseError("the gallery is empty")
    ids, names = gallery.label_ids()
    k = max(1, min(k, len(names)))
    masked = int(gallery.removed.any())
    scores, labels, rows = S.search_identities(gallery.search_index(), S.normalize(queries), ids, k + masked,
                                               **gallery.search_params(**params))
    out = []
    for s, lab, r in zip(scores, labels, rows):
        matches = [{"identity": names[l], "score": float(v), "path": gallery._paths[i]}
                   for v, l, i in zip(s, lab, r) if l >= 0][:k]
        best = matches[0] if matches else None
        known = best is not None and (threshold is None or best["score"] >= threshold)
        out.append({"identity": best["identity"] if known else "unknown",
                    "score": best["score"] if best else None, "matches": matches})
    return out


# ---------------------------------------------------------------- on disk


def save_gallery(gallery: Gallery, folder: str | Path) -> None:
    """Write ``gallery`` into ``folder`` whole, as one transaction under the writer lock (an existing
    gallery folder gets a new generation replacing its rows; any other non-empty folder is refused).
    Masked rows are left out."""
    folder = Path(folder)
    _check_writable(folder)
    index = gallery.index
    if gallery.removed.any():
        index = store.drop_positions(faiss.clone_index(index), gallery.removed)
    with locked(folder), closing(store.connect(folder, create=True)) as con:
        _check_writable(folder)
        store.write_new(con, folder, index, gallery.identities, gallery.paths, gallery.header())


@contextmanager
def _writing(folder: Path):
    """The writer lock and one database connection, the folder upgraded to the current format:
    yields ``(connection, header)``."""
    if not (folder / DB_FILE).is_file():
        read_meta(folder)  # a missing / foreign folder is refused before any file is made
    with locked(folder):
        legacy.upgrade(folder)
        with closing(store.connect(folder)) as con:
            head = store.header(con)
            if head is None:
                raise FacefuseError(f"{folder / DB_FILE}: holds no gallery; {store.REBUILD}")
            yield con, head


@contextmanager
def update_gallery(folder: str | Path, *, fingerprint: str | None = None, dim: int | None = None):
    """Read-modify-write of gallery ``folder`` under the writer lock: yields the current gallery
    (its index is read only if the block uses it); when the block returns, the rows it added are
    journalled and changed ``params`` / ``settings`` / ``model`` stored (nothing is written if it
    raises). The new rows' ids are then in ``gallery.added_ids``."""
    folder = Path(folder)
    with _writing(folder) as (con, head):
        check_model(head, folder, fingerprint=fingerprint, dim=dim)
        gallery = Gallery._of_folder(folder, head)
        yield gallery
        _commit(con, gallery, folder, head)


def _commit(con, gallery: Gallery, folder: Path, head: dict) -> None:
    changed = {k: v for k, v in gallery.header().items() if k in ("params", "settings", "model") and v != head.get(k)}
    if changed:
        store.set_header(con, **changed)
    added = np.zeros(0, np.int64)
    if gallery.pending:
        rows = gallery.pending
        added = store.append_rows(con, folder, np.concatenate([p[0] for p in rows]), [i for p in rows for i in p[1]],
                                  [i for p in rows for i in p[2]])
        if gallery._header is None:
            gallery.row_ids[-len(added):] = added
        else:
            gallery._header = {**gallery._header, "count": gallery._header["count"] + len(added)}
    gallery.pending, gallery._folder, gallery.added_ids = [], None, added
    _compact_if_due(con, folder)


def _compact_if_due(con, folder: Path) -> None:
    if store.pending(store.header(con)) >= store.AUTO_COMPACT_ROWS:
        store.compact(con, folder)


def add_to_gallery(folder: str | Path, embeddings, identities: list[str], paths: list[str], *,
                   fingerprint: str | None = None, dim: int | None = None) -> np.ndarray:
    """Enroll ``embeddings`` (normalised here) with their identities and paths into gallery
    ``folder``, writing only them; returns their row ids. Durable when it returns."""
    with update_gallery(folder, fingerprint=fingerprint, dim=dim) as gallery:
        gallery.add(embeddings, identities, paths)
    return gallery.added_ids


def remove_from_gallery(folder: str | Path, *, identity: str | None = None, path: str | None = None) -> int:
    """Remove every row of ``identity``, or the rows enrolled from image ``path`` (both: the rows
    with that identity and path). They are gone from search results when this returns; their
    vectors, identities and paths leave the files at the next compaction (:func:`compact_gallery`,
    or automatic). Returns how many rows were removed; none matching is an error naming the value."""
    if identity is None and path is None:
        raise ParameterError("identity", None, "give identity=..., path=... or both")
    folder = Path(folder)
    with _writing(folder) as (con, _):
        n = store.remove_rows(con, folder, identity=identity, path=None if path is None else str(path))
        if n == 0:
            if path is None:
                raise ParameterError("identity", identity, f"no such identity enrolled in {folder}")
            what = f"no image of identity {identity} " if identity is not None else "no image "
            raise ParameterError("path", path, f"{what}with this path enrolled in {folder}")
        _compact_if_due(con, folder)
    return n


def compact_gallery(folder: str | Path) -> dict:
    """Fold the journal of gallery ``folder`` into a new index generation and drop removed rows
    from its files. Returns ``{"generation", "rows", "folded", "dropped", "bytes_before",
    "bytes_after", "seconds"}``; with nothing pending, nothing is rewritten (``folded`` and
    ``dropped`` are 0 and the generation stays)."""
    folder = Path(folder)
    with _writing(folder) as (con, head):
        if store.pending(head):
            return store.compact(con, folder)
        store.tidy(folder, head["generation"])
        size = store.folder_bytes(folder)
        return {"generation": head["generation"], "rows": head["count"], "folded": 0, "dropped": 0,
                "bytes_before": size, "bytes_after": size, "seconds": 0.0}


def _check_writable(folder: Path) -> None:
    if folder.exists() and not _is_gallery_folder(folder):
        raise FacefuseError(f"{folder}: exists and is not a gallery index folder; choose another -o")


def _is_gallery_folder(folder: Path) -> bool:
    """A folder holding only gallery files (an empty folder counts)."""
    return folder.is_dir() and all(store.is_gallery_file(p.name) for p in folder.iterdir())


def read_meta(folder: str | Path) -> dict:
    """What gallery ``folder`` records besides its rows: ``format``, ``version``, ``kind``,
    ``count`` (live rows), ``dim``, ``model``, ``params``, ``settings``, ``generation``, and, for the
    current format, ``journal_rows`` and ``removed`` (rows pending compaction)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FacefuseError(f"{folder}: no such gallery index folder")
    head = store.read_header(folder)
    if head is not None:
        return store.public_header(head)
    meta = legacy.read_meta(folder)
    if meta is None:
        raise FacefuseError(f"{folder}: not a gallery index (needs {DB_FILE}, or the {META_FILE} of an older one)")
    return legacy.header_of(meta)


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
    """A consistent snapshot of gallery ``folder``, without taking the lock: the index with the
    journal replayed and removed rows masked. With ``fingerprint`` / ``dim``, refuse one built with
    another model."""
    folder = Path(folder)
    meta = read_meta(folder)
    check_model(meta, folder, fingerprint=fingerprint, dim=dim)
    snap = store.read_snapshot(folder) if meta["version"] >= 2 else legacy.read(folder)
    h = snap.header
    check_model(h, folder, fingerprint=fingerprint, dim=dim)
    return Gallery(snap.index, snap.identities, snap.paths, h.get("model", {}), h["kind"], h.get("params"),
                   h.get("settings"), removed=snap.removed, row_ids=snap.ids)
