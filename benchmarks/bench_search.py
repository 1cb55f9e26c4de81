"""Gallery search: exact (flat) vs IVF vs HNSW on synthetic normalised embeddings.

For each gallery size and index kind: build time, single-query latency (p50 / p99 over
``--latency-queries`` one-at-a-time searches, one OpenMP thread: one query per core), batch throughput (QPS of one call with all queries)
and recall@1 against exact search, for a sweep of ``nprobe`` (IVF) / ``efSearch`` (HNSW). The
smallest setting that reaches ``--target-recall`` is marked ``tuned``.

The gallery is ``n`` random unit vectors in D=512, either isotropic (``--data uniform``, the worst
case: no structure for IVF cells or graph links to exploit) or concentrated in a random 64-dim
subspace (``--data lowrank``, closer to real embeddings, whose variance sits in few directions).
Each query is a noisy copy of a random gallery vector with cosine ``--query-cos`` (default 0.7) to
it, like a new photo of an enrolled person; exact search defines the true neighbour.

    python benchmarks/bench_search.py                        # 1e4 and 1e5
    python benchmarks/bench_search.py --sizes 1000000 --kinds ivf hnsw

Writes benchmarks/results/search-<data>-<device>.json.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from benchmarks.common import device_name, print_table, write_results  # noqa: E402


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=float, nargs="+", default=[1e4, 1e5], help="gallery sizes (1e6: ~2 GB each)")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--kinds", nargs="+", default=["flat", "ivf", "hnsw"], choices=["flat", "ivf", "hnsw"])
    p.add_argument("--queries", type=int, default=1000, help="queries for recall and batch QPS")
    p.add_argument("--latency-queries", type=int, default=200, help="single queries timed for p50/p99")
    p.add_argument("--query-cos", type=float, default=0.7, help="cosine of a query with its source vector")
    p.add_argument("--data", choices=["uniform", "lowrank"], default="uniform",
                   help="uniform: isotropic on the sphere (no structure: the hard case for IVF/HNSW); "
                        "lowrank: 90%% of each vector in a random --rank-dim subspace (embeddings of a "
                        "trained model concentrate in few directions)")
    p.add_argument("--rank", type=int, default=64, help="subspace dimension for --data lowrank")
    p.add_argument("--nprobe", type=int, nargs="+", default=[1, 4, 16, 32, 64, 128, 256])
    p.add_argument("--ef-search", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    p.add_argument("--target-recall", type=float, default=0.99)
    p.add_argument("--threads", type=int, default=0, help="faiss OpenMP threads for build and batch (0 = all)")
    p.add_argument("--latency-threads", type=int, default=1,
                   help="OpenMP threads while timing single queries (1: one query per core, as served)")
    p.add_argument("--hnsw-max-size", type=float, default=2e5,
                   help="skip HNSW above this size (its build is ~ms per vector on a small CPU)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def _sample(rng, n: int, d: int, data: str, basis):
    """``n`` unit vectors: isotropic (``uniform``) or mostly inside a random ``rank``-dim
    subspace (``lowrank``: 90% of the energy in the subspace, 10% isotropic)."""
    from facefuse.index.search import normalize

    if data == "uniform":
        return normalize(rng.standard_normal((n, d), dtype=np.float32))
    z = rng.standard_normal((n, basis.shape[0]), dtype=np.float32) @ basis
    iso = rng.standard_normal((n, d), dtype=np.float32)
    return normalize(np.sqrt(0.9) * normalize(z) + np.sqrt(0.1) * normalize(iso))


def make_data(n: int, d: int, nq: int, query_cos: float, seed: int, data: str = "uniform", rank: int = 64):
    from facefuse.index.search import normalize

    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((d, rank)))[0].T.astype(np.float32) if data == "lowrank" else None
    xb = np.empty((n, d), dtype=np.float32)
    for s in range(0, n, 100_000):  # chunked, to keep temporaries small
        xb[s:s + 100_000] = _sample(rng, min(100_000, n - s), d, data, basis)
    src = rng.integers(0, n, nq)
    noise = _sample(rng, nq, d, data, basis)
    noise -= np.sum(noise * xb[src], 1, keepdims=True) * xb[src]  # orthogonal to the source
    noise = normalize(noise)
    xq = normalize(query_cos * xb[src] + np.sqrt(1 - query_cos ** 2) * noise)
    return xb, xq


def latency(index, xq, n_lat: int, threads: int, **params):
    import faiss

    from facefuse.index.search import search

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads)
    times = []
    try:
        for i in range(n_lat):
            t = time.perf_counter()
            search(index, xq[i:i + 1], 1, **params)
            times.append(time.perf_counter() - t)
    finally:
        faiss.omp_set_num_threads(before)
    t = np.array(times) * 1e3
    return float(np.percentile(t, 50)), float(np.percentile(t, 99))


def run_kind(kind, xb, xq, gt, args):
    from facefuse.index.search import build_index, search

    t = time.perf_counter()
    index = build_index(xb, kind)
    build_s = time.perf_counter() - t
    sweep = {"flat": [None], "ivf": args.nprobe, "hnsw": args.ef_search}[kind]
    rows, tuned = [], False
    for v in sweep:
        params = {"nprobe": v} if kind == "ivf" else {"ef_search": v} if kind == "hnsw" else {}
        search(index, xq[:10], 1, **params)  # warm-up
        t = time.perf_counter()
        _, I = search(index, xq, 1, **params)
        qps = len(xq) / (time.perf_counter() - t)
        recall = float(np.mean(I[:, 0] == gt))
        p50, p99 = latency(index, xq, args.latency_queries, args.latency_threads, **params)
        mark = not tuned and recall >= args.target_recall
        tuned = tuned or mark
        rows.append({"n": len(xb), "kind": kind, "param": (f"nprobe={v}" if kind == "ivf" else
                                                            f"ef={v}" if kind == "hnsw" else "-"),
                     "build_s": build_s, "p50_ms": p50, "p99_ms": p99, "batch_qps": qps,
                     "recall@1": recall, "tuned": "yes" if mark or kind == "flat" else ""})
    del index
    gc.collect()
    return rows


COLUMNS = ["n", "kind", "param", "build_s", "p50_ms", "p99_ms", "batch_qps", "recall@1", "tuned"]


def main(argv=None):
    args = parse_args(argv)
    import faiss

    from facefuse.index.search import build_index, search

    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    device = device_name("cuda" if faiss.get_num_gpus() > 0 else "cpu")
    results = []
    for n in (int(s) for s in args.sizes):
        xb, xq = make_data(n, args.dim, args.queries, args.query_cos, args.seed, args.data, args.rank)
        exact = build_index(xb, "flat")
        _, I = search(exact, xq, 1)
        gt = I[:, 0]
        del exact
        for kind in args.kinds:
            if kind == "hnsw" and n > args.hnsw_max_size:
                print(f"n={n}: HNSW skipped (above --hnsw-max-size {args.hnsw_max_size:g})")
                continue
            rows = run_kind(kind, xb, xq, gt, args)
            print_table(rows, COLUMNS)
            results += rows
        del xb, xq
        gc.collect()
    print("\nall cases:")
    print_table(results, COLUMNS)
    settings = dict(vars(args))
    settings["faiss_threads"] = faiss.omp_get_max_threads()
    settings["faiss_gpus"] = faiss.get_num_gpus()
    path = write_results(f"search-{args.data}", device, settings, results)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
