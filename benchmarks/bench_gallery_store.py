"""Gallery folder writes: enrolment, removal, open and search with a pending journal, against the
rewrite-everything gallery this storage replaced.

For each ``--sizes`` gallery (flat, ``--dim``, ten images per identity, paths like real ones):

- ``old``: the previous ``index/gallery.py`` (read from git, ``--old-commit``) enrolling one face
  into its folder: read ``meta.json`` and the index, add, write a new index generation and the
  whole ``meta.json`` (``--old-repeats`` times, p50). Its folder size. Then the first write of the
  current code into that folder: the in-place upgrade plus the add (once).
- ``enrol``: :func:`add_to_gallery` of one face, ``--repeats`` times (p50 / p99), embedding
  excluded (vectors are given); ``remove``: :func:`remove_from_gallery` of one image path, as often.
- ``open``: :func:`read_meta` and :func:`load_gallery` (index read, journal replayed, rows read).
- search: ``--queries`` single-query searches (top-5 identities, one OpenMP thread), ``--rounds``
  times, in the gallery with ``--journal`` rows journalled and 100 removed (automatic compaction
  held off meanwhile) and in a copy compacted by :func:`compact_gallery` (the same rows, all in
  the index file), the two taken in turn per query: p50 / p99 and the ratio of the p50s. The
  compaction's time and the folder size before and after it.

Queries are noisy copies (cosine 0.7) of gallery rows, as in bench_search.py. Every file goes to a
temporary folder removed at the end. The load average (``uptime``) at the start and the end is
recorded: this machine is shared, so latencies carry that noise.

    python benchmarks/bench_gallery_store.py                         # 1e4 x 512 and 1e6 x 512
    python benchmarks/bench_gallery_store.py --sizes 1e4 --repeats 20

Writes benchmarks/results/gallery_store-<device>.json.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import faiss  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import RESULTS_DIR, device_name, print_table, write_results  # noqa: E402
from facefuse.index import search as S  # noqa: E402
from facefuse.index import store  # noqa: E402
from facefuse.index.gallery import (add_to_gallery, build_gallery, compact_gallery, load_gallery,  # noqa: E402
                                    read_meta, remove_from_gallery, save_gallery, search_gallery)

OLD_COMMIT = "484802d"  # the last commit with the rewrite-everything index/gallery.py
COLUMNS = ["n", "dim", "old_add_p50_s", "upgrade_add_s", "enrol_p50_ms", "enrol_p99_ms", "remove_p50_ms",
           "remove_p99_ms", "read_meta_ms", "open_s", "search_pending_p50_ms", "search_compacted_p50_ms",
           "search_ratio", "compact_s", "old_mb", "mb_pending", "mb_compacted"]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=float, nargs="+", default=[1e4, 1e6])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--repeats", type=int, default=50, help="enrolments and removals timed per size")
    p.add_argument("--old-repeats", type=int, default=3, help="rewrite-everything enrolments timed per size")
    p.add_argument("--journal", type=int, default=10_000, help="rows journalled before the search (at most n/10)")
    p.add_argument("--queries", type=int, default=30, help="single-query searches timed per stage and round")
    p.add_argument("--rounds", type=int, default=3, help="times each query is searched in each gallery")
    p.add_argument("--threads", type=int, default=1, help="faiss OpenMP threads")
    p.add_argument("--old-commit", default=OLD_COMMIT)
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    return p.parse_args(argv)


def load_average() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip().split("load average:")[-1].strip()


def old_gallery_module(commit: str, tmp: Path):
    """The ``index/gallery.py`` of ``commit`` as a module of its own."""
    src = subprocess.run(["git", "show", f"{commit}:index/gallery.py"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    path = tmp / "old_gallery.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("old_gallery", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["old_gallery"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def unit_rows(n: int, d: int, seed: int) -> np.ndarray:
    out = np.empty((n, d), np.float32)
    for s in range(0, n, 100_000):
        block = np.random.default_rng(seed + s).standard_normal((min(100_000, n - s), d), dtype=np.float32)
        out[s:s + len(block)] = S.normalize(block)
    return out


def rows(n: int, start: int = 0) -> tuple[list[str], list[str]]:
    ids = [f"person_{i // 10:07d}" for i in range(start, start + n)]
    return ids, [f"/data/gallery/{p}/{p}_{i % 10:04d}.jpg" for p, i in zip(ids, range(start, start + n))]


def queries(x: np.ndarray, q: int, seed: int, cos: float = 0.7) -> np.ndarray:
    rng = np.random.default_rng(seed)
    src = x[rng.integers(0, len(x), q)]
    noise = rng.standard_normal(src.shape).astype(np.float32)
    noise = S.normalize(noise - np.sum(noise * src, 1, keepdims=True) * src)
    return S.normalize(cos * src + np.sqrt(1 - cos ** 2) * noise)


def timed(fn, repeats: int) -> np.ndarray:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return np.array(out)


def folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and not p.is_symlink()) / 2 ** 20


def search_times(folders: list[Path], xq: np.ndarray, rounds: int = 3) -> list[np.ndarray]:
    """Seconds of each one-query top-5 search of ``xq`` in the gallery of each folder, the folders
    taken in turn for every query (so a change in the machine's load hits them alike)."""
    galleries = [load_gallery(f) for f in folders]
    for g in galleries:
        search_gallery(g, xq[:1], k=5)  # the label array is made once, outside the timing
    out = [[] for _ in folders]
    for _ in range(rounds):
        for q in xq:
            for g, times in zip(galleries, out):
                t = time.perf_counter()
                search_gallery(g, q[None], k=5)
                times.append(time.perf_counter() - t)
    return [np.array(t) for t in out]


def measure(n: int, d: int, args, old, tmp: Path) -> dict:
    r = {"n": n, "dim": d}
    extra = args.repeats + 1 + min(args.journal, n // 10) + args.old_repeats + 1
    x = unit_rows(n + extra, d, seed=n)
    ids, paths = rows(n + extra)
    xq = queries(x[:n], args.queries, seed=1)
    at = n

    def take(k):
        nonlocal at
        at += k
        return x[at - k:at], ids[at - k:at], paths[at - k:at]

    # the rewrite-everything gallery, then the first current write into its folder (upgrade + add)
    old_dir = tmp / "old"
    old.save_gallery(old.build_gallery(x[:n], ids[:n], paths[:n], {}, "flat"), old_dir)
    gc.collect()

    def old_add():
        with old.update_gallery(old_dir) as g:
            g.add(*take(1))
    r["old_add_p50_s"] = float(np.median(timed(old_add, args.old_repeats)))
    r["old_mb"] = folder_mb(old_dir)
    r["upgrade_add_s"] = float(timed(lambda: add_to_gallery(old_dir, *take(1)), 1)[0])
    shutil.rmtree(old_dir)
    gc.collect()

    folder = tmp / "new"
    t = time.perf_counter()
    save_gallery(build_gallery(x[:n], ids[:n], paths[:n], {}, "flat"), folder)
    r["save_s"] = time.perf_counter() - t
    r["mb_saved"] = folder_mb(folder)
    gc.collect()
    enrol = timed(lambda: add_to_gallery(folder, *take(1)), args.repeats)
    gone = iter(paths[:n:max(1, n // (args.repeats + 101))])
    remove = timed(lambda: remove_from_gallery(folder, path=next(gone)), args.repeats)
    r.update(enrol_p50_ms=1e3 * np.median(enrol), enrol_p99_ms=1e3 * np.quantile(enrol, 0.99),
             remove_p50_ms=1e3 * np.median(remove), remove_p99_ms=1e3 * np.quantile(remove, 0.99))

    # a pending journal of `journal` rows (in adds of 500) and 100 more removed, compaction held off
    journal = min(args.journal, n // 10)
    held, store.AUTO_COMPACT_ROWS = store.AUTO_COMPACT_ROWS, 10 ** 9
    t = time.perf_counter()
    for s in range(0, journal - args.repeats, 500):
        add_to_gallery(folder, *take(min(500, journal - args.repeats - s)))
    r["journal_rows_per_s"] = (journal - args.repeats) / (time.perf_counter() - t)
    for _ in range(100):
        remove_from_gallery(folder, path=next(gone))
    meta = read_meta(folder)
    r["pending_journal_rows"], r["pending_removed"] = meta["journal_rows"], meta["removed"]
    r["read_meta_ms"] = 1e3 * float(np.median(timed(lambda: read_meta(folder), 20)))
    r["open_s"] = float(np.median(timed(lambda: load_gallery(folder), 2)))
    r["mb_pending"] = folder_mb(folder)
    before = tmp / "pending"
    shutil.copytree(folder, before, symlinks=True)
    stats = compact_gallery(folder)
    store.AUTO_COMPACT_ROWS = held
    r["compact_s"], r["mb_compacted"] = stats["seconds"], folder_mb(folder)
    r["open_compacted_s"] = float(np.median(timed(lambda: load_gallery(folder), 2)))
    del x
    gc.collect()
    pending, compacted = search_times([before, folder], xq, args.rounds)
    shutil.rmtree(before)
    r.update(search_pending_p50_ms=1e3 * np.median(pending), search_pending_p99_ms=1e3 * np.quantile(pending, 0.99),
             search_compacted_p50_ms=1e3 * np.median(compacted),
             search_compacted_p99_ms=1e3 * np.quantile(compacted, 0.99),
             search_ratio=float(np.median(pending) / np.median(compacted)))
    shutil.rmtree(folder)
    return {k: (round(float(v), 4) if isinstance(v, (float, np.floating)) else v) for k, v in r.items()}


def main(argv=None):
    args = parse_args(argv)
    faiss.omp_set_num_threads(args.threads)
    load_start = load_average()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        old = old_gallery_module(args.old_commit, Path(tmp))
        for size in args.sizes:
            case = Path(tmp) / f"n{int(size)}"
            case.mkdir()
            results.append(measure(int(size), args.dim, args, old, case))
            print_table(results[-1:], COLUMNS)
            gc.collect()
    settings = {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"},
                "kind": "flat", "auto_compact_rows": store.AUTO_COMPACT_ROWS, "load_average_start": load_start,
                "load_average_end": load_average(), "cpu_count": os.cpu_count()}
    print_table(results, COLUMNS)
    path = write_results("gallery_store", device_name("cpu"), settings, results, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
