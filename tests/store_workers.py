"""Processes of the gallery-store crash and concurrency tests (tests/test_gallery_store.py), in a
module that imports no torch, so a forkserver can preload it and fork a worker in milliseconds.

Every write here is one of the ops of :func:`apply`. The vectors of an add are a function of its
name, so the test's model (a plain dict identity -> {path: vector}) can be rebuilt from the logs."""

from __future__ import annotations

import os
import signal
import time
import zlib

import numpy as np

from facefuse.core.errors import FacefuseError
from facefuse.index import gallery as G
from facefuse.index import store

DIM = 8


def vectors(group: str, n: int) -> np.ndarray:
    """The unit vectors of add group ``group`` (deterministic in its name)."""
    x = np.random.default_rng(zlib.crc32(group.encode())).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def paths(group: str, n: int) -> list[str]:
    return [f"{group}/{j}" for j in range(n)]


def apply(folder: str, op: tuple) -> None:
    """``("add", identity, group, n)`` (``n`` rows, paths ``group/j``), ``("remove-identity",
    identity)``, ``("remove-path", path)`` or ``("compact",)``."""
    if op[0] == "add":
        G.add_to_gallery(folder, vectors(op[2], op[3]), [op[1]] * op[3], paths(op[2], op[3]))
    elif op[0] == "remove-identity":
        G.remove_from_gallery(folder, identity=op[1])
    elif op[0] == "remove-path":
        G.remove_from_gallery(folder, path=op[1])
    else:
        G.compact_gallery(folder)


def crash_worker(folder: str, op: tuple, kill_at: int, log: str, auto_compact: int) -> None:
    """Apply ``op``, killing this process with SIGKILL at the ``kill_at``-th step of the write (the
    steps passed are appended to ``log`` first); ``kill_at=0`` runs it to the end."""
    store.AUTO_COMPACT_ROWS = auto_compact
    seen = 0

    def hook(name: str) -> None:
        nonlocal seen
        seen += 1
        with open(log, "a") as f:
            f.write(name + "\n")
        if seen == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    store.step_hook = hook
    apply(folder, op)


def writer(folder: str, name: str, ops: list, log: str, auto_compact: int) -> None:
    """Apply ``ops`` in turn, logging ``start i`` before and ``ack i`` after each (one ``write``
    each, so a kill leaves whole lines). A remove that finds nothing (its add was never
    acknowledged) is logged ``none i``."""
    store.AUTO_COMPACT_ROWS = auto_compact
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    for i, op in enumerate(ops):
        os.write(fd, f"start {i}\n".encode())
        try:
            apply(folder, op)
        except FacefuseError:
            os.write(fd, f"none {i}\n".encode())
            continue
        os.write(fd, f"ack {i}\n".encode())
    os.close(fd)


def reader(folder: str, groups: dict, stop, out) -> None:
    """Load and search the gallery until ``stop`` is set; put ``(reads, problems)`` on ``out``. A
    snapshot must be whole: its rows and index agree, each add group (``groups``: identity ->
    size) shows at most its size, and the best match of a live row's own vector is that row."""
    reads, problems = 0, []
    while not stop.is_set():
        try:
            g = G.load_gallery(folder)
            if len(g) != len(g.identities) or len(g) != len(g.paths):
                problems.append(f"rows disagree: {len(g)} / {len(g.identities)} / {len(g.paths)}")
            counts: dict = {}
            for i in g.identities:
                counts[i] = counts.get(i, 0) + 1
            problems += [f"{i}: {c} rows of {groups[i]}" for i, c in counts.items() if i in groups and c > groups[i]]
            if len(g):
                probe = g.paths[reads % len(g)]
                group, j = probe.rsplit("/", 1)
                hit = G.search_gallery(g, vectors(group, int(j) + 1)[-1:], k=1)[0]["matches"][0]
                if hit["path"] != probe and abs(hit["score"] - 1) > 1e-4:
                    problems.append(f"{probe}: best match {hit}")
            reads += 1
        except Exception as exc:  # noqa: BLE001  (any failure of a reader is what the test counts)
            problems.append(repr(exc))
        time.sleep(0.005)
    out.put((reads, problems))
