"""A gallery folder on disk (format version 2): rows in SQLite, vectors in a faiss index plus an
append-only journal. :mod:`index.gallery` is the interface; this module is the storage under it.

Files of a folder:

``gallery.db``          SQLite in WAL mode. ``meta`` (key -> JSON): format, version, kind, dim, model,
                        params, settings, generation, index_rows, journal_first_id, journal_rows,
                        next_id, count (live rows), removed (rows removed since the last
                        compaction). ``rows``: one
                        per enrolled vector: a stable ``id`` (never reused), identity, path,
                        ``removed`` (0/1) and the times it was added and removed.
``index-<G>.faiss``     generation ``G``: the vectors of the rows with ``id < journal_first_id``, at
                        positions in ``id`` order (removed ones included until compaction).
``journal-<G>.f32``     the vectors added since: a 16-byte header, then ``(id int64, float32[dim])``
                        records in ``id`` order. Only the first ``journal_rows`` records count; bytes
                        past them are an interrupted append, cut off by the next writer.
``index.faiss``         a symbolic link to the current generation, for tools that open it by name.
``.lock``               the writer lock (``fcntl.flock``), taken by the caller of every write here.

So the in-memory index of a snapshot is ``index-<G>`` with the journal added: position ``p`` holds
the ``p``-th row in ``id`` order, and removed rows are masked until :func:`compact` drops them.

Writes (the caller holds the lock). Every write ends in one SQLite transaction, its commit point,
made with ``synchronous=FULL``: the WAL is fsynced before the commit returns, so what a call
acknowledges survives a power cut, not only a crash. (``NORMAL`` would lose the last transactions
on power loss; enrolment pays one fsync for that.)

- :func:`append_rows`: cut the journal back to ``journal_rows`` records, append the new records,
  fsync, then insert the rows and advance ``journal_rows`` in one transaction.
- :func:`remove_rows`: one transaction marking the rows removed (vectors stay until compaction).
- :func:`compact`: write ``index-<G+1>`` (the live rows only; flat drops rows in place, other kinds
  are rebuilt from their reconstructed vectors with the trained quantisers kept) under a temp
  name, fsync, rename; then one transaction deletes the removed rows and names ``G+1``; then the
  old generation files are deleted and the WAL is truncated, so a removed row's identity, path and
  vector are no longer on disk (SQLite runs with ``secure_delete`` so freed pages are zeroed; a
  reader inside the WAL at that moment keeps it from being truncated, and the next checkpoint, at
  the latest when the last connection closes, writes over it).
- :func:`write_new`: a whole gallery as a new generation (``save_gallery``).

Readers take no lock: one read transaction gives the header and rows (WAL readers see the last
commit and never wait for the writer), then the generation files it names are read. A compaction
that deletes them in between makes the reader try again; a file missing while the database still
names it is damage, reported with how to rebuild.

Folders of format version 1 (``meta.json``) are read and upgraded by :mod:`index.legacy`.

Crash tests stop a writer between the steps named by :func:`step` (:data:`step_hook`).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import sqlite3
import time
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import faiss
import numpy as np

from facefuse.core.errors import FacefuseError

DB_FILE = "gallery.db"
LOCK_FILE = ".lock"
INDEX_LINK = "index.faiss"
LEGACY_META = "meta.json"
FORMAT = "facefuse-gallery"
VERSION = 2
# Compaction runs by itself at the end of a write that leaves this many rows pending (journalled
# plus removed-but-present): 10^4 journalled rows kept search p50 within 10% at 10^6 flat rows
# (benchmarks/bench_gallery_store.py), and replaying them on open takes a fraction of a second.
AUTO_COMPACT_ROWS = 10_000
READ_RETRIES = 20
BUSY_TIMEOUT_S = 60.0
JOURNAL_MAGIC = b"FFJRNL02"
JOURNAL_HEADER = 16  # magic, uint32 dim, uint32 reserved
REBUILD = "rebuild the index from its images or embeddings"
GENERATION_FILE = re.compile(r"(index|journal)-(\d+)\.(faiss|f32)$")

SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE rows (id INTEGER PRIMARY KEY, identity TEXT NOT NULL, path TEXT NOT NULL,
                   removed INTEGER NOT NULL DEFAULT 0, added_at REAL NOT NULL, removed_at REAL);
CREATE INDEX rows_identity ON rows (identity) WHERE removed = 0;
CREATE INDEX rows_path ON rows (path) WHERE removed = 0;
"""

step_hook: Callable[[str], None] | None = None  # crash tests: called at each named step of a write


def step(name: str) -> None:
    if step_hook is not None:
        step_hook(name)


def index_name(gen: int) -> str:
    return f"index-{gen:06d}.faiss"


def journal_name(gen: int) -> str:
    return f"journal-{gen:06d}.f32"


# ---------------------------------------------------------------- files and the database


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


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def connect(folder: Path, *, create: bool = False) -> sqlite3.Connection:
    """A connection to ``folder/gallery.db`` in autocommit mode (transactions are explicit). A
    write opens one and passes it through every step: closing the last connection of a database
    checkpoints its WAL, which costs an fsync."""
    uri = f"{(folder / DB_FILE).resolve().as_uri()}?mode={'rwc' if create else 'rw'}"
    con = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=BUSY_TIMEOUT_S)
    if create:
        con.execute("PRAGMA journal_mode=WAL")  # persistent: recorded in the database file
    con.execute("PRAGMA synchronous=FULL")
    con.execute("PRAGMA secure_delete=ON")
    return con


def header(con: sqlite3.Connection) -> dict | None:
    """The ``meta`` table as a dict, or ``None`` where none was committed (not a version-2 folder)."""
    try:
        return {k: json.loads(v) for k, v in con.execute("SELECT key, value FROM meta")}
    except sqlite3.OperationalError:  # no meta table: the database was never committed
        return None


def create_schema(con: sqlite3.Connection) -> None:
    """The tables, inside the caller's transaction (SQLite DDL is transactional)."""
    for statement in filter(str.strip, SCHEMA.split(";")):
        con.execute(statement)


def set_values(con: sqlite3.Connection, **values) -> None:
    con.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                    [(k, json.dumps(v)) for k, v in values.items()])


def read_header(folder: Path) -> dict | None:
    """The committed header of a version-2 folder, ``None`` if it has no committed ``gallery.db``."""
    if not (folder / DB_FILE).is_file():
        return None
    try:
        with closing(connect(folder)) as con:
            return header(con)
    except sqlite3.DatabaseError as exc:
        raise FacefuseError(f"{folder / DB_FILE}: not a readable gallery database ({exc}); {REBUILD}") from None


def public_header(h: dict) -> dict:
    """What :func:`index.gallery.read_meta` returns of a version-2 header."""
    return {**h, "index_file": index_name(h["generation"]), "journal_file": journal_name(h["generation"])}


# ---------------------------------------------------------------- the journal


def _record_dtype(dim: int) -> np.dtype:
    return np.dtype([("id", "<i8"), ("vec", "<f4", (dim,))])


def read_journal(path: Path, dim: int, rows: int) -> tuple[np.ndarray, np.ndarray] | None:
    """``(ids, vectors)`` of the first ``rows`` records, or ``None`` if the file is missing or short."""
    if rows == 0:
        return np.zeros(0, np.int64), np.zeros((0, dim), np.float32)
    dt = _record_dtype(dim)
    try:
        with open(path, "rb") as f:
            head = f.read(JOURNAL_HEADER)
            data = f.read(rows * dt.itemsize)
    except FileNotFoundError:
        return None
    if head[:8] != JOURNAL_MAGIC or len(data) < rows * dt.itemsize:
        return None
    rec = np.frombuffer(data, dt)
    return rec["id"].copy(), np.ascontiguousarray(rec["vec"])


def _append_journal(folder: Path, gen: int, dim: int, committed: int, ids: np.ndarray, vectors: np.ndarray) -> None:
    """Cut ``journal-<gen>`` back to its ``committed`` records, append ``(ids, vectors)``, fsync."""
    path = folder / journal_name(gen)
    dt = _record_dtype(dim)
    rec = np.empty(len(ids), dt)
    rec["id"], rec["vec"] = ids, vectors
    data = rec.tobytes()
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        new = os.fstat(fd).st_size == 0
        if new:
            os.write(fd, JOURNAL_MAGIC + np.array([dim, 0], "<u4").tobytes())
        end = JOURNAL_HEADER + committed * dt.itemsize
        os.ftruncate(fd, end)
        step("journal-truncated")
        half = len(data) // 2
        os.pwrite(fd, data[:half], end)
        step("journal-half-written")  # a torn append: the crash tests stop here too
        os.pwrite(fd, data[half:], end + half)
        step("journal-written")
        os.fsync(fd)
    finally:
        os.close(fd)
    if new:
        fsync_path(folder)
    step("journal-synced")


# ---------------------------------------------------------------- snapshots (readers)


@dataclass
class Snapshot:
    """One committed state: header, every row of the generation in ``id`` order, and the index
    (generation file with the journal added) whose position ``p`` holds row ``ids[p]``."""

    header: dict
    ids: np.ndarray
    identities: list[str]
    paths: list[str]
    removed: np.ndarray
    index: faiss.Index


def read_snapshot(folder: Path) -> Snapshot:
    """A consistent snapshot of a version-2 folder (no lock; retried if a compaction races it)."""
    for _ in range(READ_RETRIES):
        with closing(connect(folder)) as con:
            con.execute("BEGIN")
            h = header(con)
            if h is None:
                raise FacefuseError(f"{folder / DB_FILE}: holds no gallery; {REBUILD}")
            rows = con.execute("SELECT id, identity, path, removed FROM rows ORDER BY id").fetchall()
            con.execute("COMMIT")
        snap, problem = _open_files(folder, h, rows)
        if snap is not None:
            return snap
        now = read_header(folder) or {}
        if now.get("generation") == h["generation"]:
            raise FacefuseError(problem)
    raise FacefuseError(f"{folder}: changed {READ_RETRIES} times while being read; try again")


def _open_files(folder: Path, h: dict, rows: list) -> tuple[Snapshot | None, str | None]:
    gen, dim, first = h["generation"], h["dim"], h["journal_first_id"]
    ids = np.fromiter((r[0] for r in rows), np.int64, len(rows))
    base = int(np.searchsorted(ids, first))
    path = folder / index_name(gen)
    try:
        index = faiss.read_index(str(path))
    except RuntimeError:
        return None, f"{path}: {'is missing' if not path.exists() else 'not a faiss index file'}; {REBUILD}"
    if index.ntotal != base or index.d != dim:
        return None, (f"{folder}: {path.name} holds {index.ntotal} {index.d}-d vectors but {DB_FILE} lists {base} "
                      f"{dim}-d ones; {REBUILD}")
    journal = read_journal(folder / journal_name(gen), dim, h["journal_rows"])
    if journal is None or not np.array_equal(journal[0], ids[base:]):
        return None, (f"{folder}: {journal_name(gen)} does not hold the {h['journal_rows']} journalled rows "
                      f"{DB_FILE} lists; {REBUILD}")
    for s in range(0, len(journal[1]), 65_536):
        index.add(journal[1][s:s + 65_536])
    removed = np.fromiter((r[3] for r in rows), bool, len(rows))
    return Snapshot(h, ids, [r[1] for r in rows], [r[2] for r in rows], removed, index), None


# ---------------------------------------------------------------- writes (caller holds the lock)


def check_files(folder: Path, h: dict) -> None:
    """Refuse to write to a folder whose files disagree with its header, from their sizes alone (a
    faiss file starts with fourcc, int32 d, int64 ntotal): the full check is on open."""
    path = folder / index_name(h["generation"])
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except FileNotFoundError:
        raise FacefuseError(f"{path}: is missing; {REBUILD}") from None
    if len(head) < 16:
        raise FacefuseError(f"{path}: not a faiss index file; {REBUILD}")
    d, ntotal = int(np.frombuffer(head, "<i4", 1, 4)[0]), int(np.frombuffer(head, "<i8", 1, 8)[0])
    if (ntotal, d) != (h["index_rows"], h["dim"]):
        raise FacefuseError(f"{folder}: {path.name} holds {ntotal} {d}-d vectors but {DB_FILE} lists "
                            f"{h['index_rows']} {h['dim']}-d ones; {REBUILD}")
    journal = folder / journal_name(h["generation"])
    size = journal.stat().st_size if journal.exists() else 0
    if h["journal_rows"] and size < JOURNAL_HEADER + h["journal_rows"] * _record_dtype(h["dim"]).itemsize:
        raise FacefuseError(f"{journal}: holds fewer than the {h['journal_rows']} journalled rows {DB_FILE} lists; "
                            f"{REBUILD}")


def write_new(con: sqlite3.Connection, folder: Path, index: faiss.Index, identities: list[str], paths: list[str],
              head: dict) -> None:
    """Replace the folder's gallery by ``index`` and its rows (a new generation; ids from 0)."""
    old = header(con)
    gen = max([old["generation"] if old else 0, *generations(folder)], default=0) + 1
    write_index(folder, index, gen)
    n, now = len(identities), time.time()
    con.execute("BEGIN IMMEDIATE")
    if header(con) is None:
        create_schema(con)
    con.execute("DELETE FROM rows")
    con.executemany("INSERT INTO rows (id, identity, path, added_at) VALUES (?, ?, ?, ?)",
                    zip(range(n), identities, paths, [now] * n))
    set_values(con, **head, format=FORMAT, version=VERSION, generation=gen, index_rows=int(index.ntotal),
         journal_first_id=n, journal_rows=0, next_id=n, count=n, removed=0)
    step("db-written")
    con.execute("COMMIT")
    step("committed")
    fsync_path(folder)
    tidy(folder, gen)


def append_rows(con: sqlite3.Connection, folder: Path, vectors: np.ndarray, identities: list[str],
                paths: list[str]) -> np.ndarray:
    """Journal normalised ``vectors`` with their rows; returns the new row ids."""
    step("begin")
    con.execute("BEGIN IMMEDIATE")
    h = header(con)
    check_files(folder, h)
    ids = np.arange(h["next_id"], h["next_id"] + len(vectors), dtype=np.int64)
    _append_journal(folder, h["generation"], h["dim"], h["journal_rows"], ids, vectors)
    now = time.time()
    con.executemany("INSERT INTO rows (id, identity, path, added_at) VALUES (?, ?, ?, ?)",
                    zip(ids.tolist(), identities, paths, [now] * len(ids)))
    set_values(con, journal_rows=h["journal_rows"] + len(ids), next_id=h["next_id"] + len(ids),
               count=h["count"] + len(ids))
    step("db-written")
    con.execute("COMMIT")
    step("committed")
    return ids


def remove_rows(con: sqlite3.Connection, folder: Path, *, identity: str | None = None, path: str | None = None) -> int:
    """Mark the live rows of ``identity`` and/or ``path`` removed; returns how many (0: none matched,
    nothing written)."""
    where, args = ["removed = 0"], []
    if identity is not None:
        where.append("identity = ?")
        args.append(identity)
    if path is not None:
        where.append("path = ?")
        args.append(str(path))
    step("begin")
    con.execute("BEGIN IMMEDIATE")
    h = header(con)
    check_files(folder, h)
    n = con.execute(f"UPDATE rows SET removed = 1, removed_at = ? WHERE {' AND '.join(where)}",
                    [time.time(), *args]).rowcount
    if n == 0:
        con.execute("ROLLBACK")
        return 0
    set_values(con, count=h["count"] - n, removed=h["removed"] + n)
    step("db-written")
    con.execute("COMMIT")
    step("committed")
    return n


def set_header(con: sqlite3.Connection, **values) -> None:
    """Replace header entries (kind parameters, settings) in one transaction."""
    con.execute("BEGIN IMMEDIATE")
    set_values(con, **values)
    con.execute("COMMIT")


def pending(h: dict) -> int:
    """Rows a compaction would fold in or drop."""
    return h["journal_rows"] + h["removed"]


def compact(con: sqlite3.Connection, folder: Path) -> dict:
    """Fold the journal into a new generation without the removed rows (see the module docstring)."""
    step("begin")
    t0 = time.perf_counter()
    snap = read_snapshot(folder)
    h = snap.header
    before = folder_bytes(folder)
    gen = h["generation"] + 1
    index = drop_positions(snap.index, snap.removed)
    step("index-built")
    write_index(folder, index, gen)
    con.execute("BEGIN IMMEDIATE")
    con.execute("DELETE FROM rows WHERE removed = 1")
    set_values(con, generation=gen, index_rows=int(index.ntotal), journal_first_id=h["next_id"], journal_rows=0,
               removed=0)
    step("db-written")
    con.execute("COMMIT")
    step("committed")
    tidy(folder, gen)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # busy (a reader inside) is fine: see docstring
    step("checkpointed")
    return {"generation": gen, "rows": int(index.ntotal), "folded": h["journal_rows"],
            "dropped": int(snap.removed.sum()),
            "bytes_before": before, "bytes_after": folder_bytes(folder), "seconds": time.perf_counter() - t0}


def drop_positions(index: faiss.Index, drop: np.ndarray) -> faiss.Index:
    """``index`` without the positions where ``drop`` is true, the others renumbered in order. Flat
    removes in place; the other kinds cannot remove (or would leave holes in their ids), so the
    kept vectors are reconstructed (exactly, or their 8-bit codes for the SQ8 kinds, which re-encode
    to the same codes) and added to an empty copy that keeps the trained quantisers."""
    if not drop.any():
        return index
    keep = np.flatnonzero(~drop)
    if isinstance(faiss.downcast_index(index), faiss.IndexFlat):
        index.remove_ids(faiss.IDSelectorBatch(np.flatnonzero(drop).astype(np.int64)))
        return index
    ivf = faiss.try_extract_index_ivf(index)
    plain_ivf = ivf is not None and isinstance(faiss.downcast_index(index), faiss.IndexIVF)
    if plain_ivf:
        ivf.make_direct_map(True)
    fresh = faiss.clone_index(index)
    fresh.reset()
    if plain_ivf:
        faiss.extract_index_ivf(fresh).make_direct_map(False)
    for s in range(0, len(keep), 65_536):
        fresh.add(index.reconstruct_batch(keep[s:s + 65_536].astype(np.int64)))
    return fresh


def write_index(folder: Path, index: faiss.Index, gen: int) -> None:
    tmp = folder / f".{index_name(gen)}.tmp"
    faiss.write_index(index, str(tmp))
    step("index-written")
    fsync_path(tmp)
    os.replace(tmp, folder / index_name(gen))
    fsync_path(folder)
    step("index-synced")


def tidy(folder: Path, gen: int) -> None:
    """Point ``index.faiss`` at generation ``gen`` and delete every other generation's files, temp
    files and a version-1 ``meta.json`` (readers that still want them retry with ``gen``)."""
    link = folder / f".{INDEX_LINK}.{os.getpid()}.tmp"
    link.unlink(missing_ok=True)
    os.symlink(index_name(gen), link)
    os.replace(link, folder / INDEX_LINK)
    for p in folder.iterdir():
        m = GENERATION_FILE.match(p.name)
        if (m and int(m.group(2)) != gen) or (p.name.startswith(".") and p.name.endswith(".tmp")):
            p.unlink(missing_ok=True)
    (folder / LEGACY_META).unlink(missing_ok=True)
    fsync_path(folder)
    step("old-files-deleted")


def is_gallery_file(name: str) -> bool:
    """Whether a file of this name belongs in a gallery folder (of either format version)."""
    return (name in (DB_FILE, f"{DB_FILE}-wal", f"{DB_FILE}-shm", f"{DB_FILE}-journal", LOCK_FILE, INDEX_LINK,
                     LEGACY_META) or GENERATION_FILE.match(name) is not None
            or (name.startswith(".") and name.endswith(".tmp")))


def generations(folder: Path) -> list[int]:
    if not folder.is_dir():
        return []
    return [int(m.group(2)) for p in folder.iterdir() if (m := GENERATION_FILE.match(p.name))]


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and not p.is_symlink())
