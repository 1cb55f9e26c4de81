"""Writer and reader processes of the concurrent-gallery test, in a module that imports no torch,
so each spawned interpreter starts in a fraction of a second."""

from pathlib import Path

import numpy as np

from facefuse.index.enroll import add_embeddings_to_index_folder
from facefuse.index.gallery import load_gallery

WRITERS, ADDS, ROWS, DIM = 4, 3, 7, 16


def writer(folder, w, start):
    rng = np.random.default_rng(100 + w)
    start.wait()
    for a in range(ADDS):
        tmp = Path(folder).parent / f"w{w}-{a}"
        tmp.mkdir()
        np.save(tmp / "e.npy", rng.standard_normal((ROWS, DIM)).astype(np.float32))
        (tmp / "l.txt").write_text(f"writer{w}\n" * ROWS)
        add_embeddings_to_index_folder(folder, tmp / "e.npy", tmp / "l.txt")


def reader(folder, start, stop, out):
    start.wait()
    reads, errors = 0, []
    while not stop.is_set():
        try:
            g = load_gallery(folder)
            counts = {}
            for i in g.identities:
                counts[i] = counts.get(i, 0) + 1
            if len(g) != len(g.identities) or any(c % ROWS for k, c in counts.items() if k != "seed"):
                errors.append(f"inconsistent: {len(g)} vectors, {counts}")
            reads += 1
        except Exception as exc:  # noqa: BLE001  (any failure of a reader is what the test counts)
            errors.append(repr(exc))
    out.put((reads, errors))
