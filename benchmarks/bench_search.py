"""Gallery search: every index kind of ``index.search.KINDS`` on synthetic normalised embeddings.

For each gallery size and kind: build time (train + add, data generation excluded), resident
memory after the build (``rss_gb``: the whole process, which holds the index, the queries and a
training sample but never the full gallery; ``index_gb``: the growth during the build), and for a
sweep of search parameters (``nprobe`` x ``k_factor`` for the IVF kinds, ``efSearch`` for HNSW):
single-query latency p50 / p99 over ``--latency-queries`` one-at-a-time searches with one OpenMP
thread (one query per core, as served), batched throughput (QPS of one call with all queries and
``--threads`` threads, 0 = every core), and recall@1 against exact search. Among the settings
that reach ``--target-recall`` the fastest p50 is marked ``tuned``.

The gallery is generated in chunks of 100k rows (each from its own seed), so 10^7 x 256 never
exists in memory at once: a first pass collects the query sources and a training sample, a second
computes the exact neighbours, and each kind's build regenerates the chunks as it adds them. Data:
``uniform`` (isotropic on the sphere, the hard case: no structure for IVF cells or graph links) or
``lowrank`` (90% of each vector in a random ``--rank``-dim subspace, like real embeddings). Each
query is a noisy copy of a random gallery vector at cosine ``--query-cos`` (0.7, like a new photo
of an enrolled face); exact search defines the true neighbour.

    python benchmarks/bench_search.py                                   # 1e4 and 1e5, every kind
    python benchmarks/bench_search.py --sizes 1e6 --kinds flat ivfpq    # the 10^6 x 512 target
    python benchmarks/bench_search.py --sizes 1e7 --dim 256 --kinds ivfpq-sq8

Writes benchmarks/results/search-<data>[-<tag>]-<device>.json.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import os
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from benchmarks.common import RESULTS_DIR, device_name, print_table, write_results  # noqa: E402

CHUNK = 100_000
ALL_KINDS = ["flat", "ivf", "hnsw", "ivfpq", "ivfpq-sq8", "hnsw-sq8"]  # index.search.KINDS


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=float, nargs="+", default=[1e4, 1e5], help="gallery sizes (1e6, 1e7: chunked)")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--kinds", nargs="+", default=ALL_KINDS, choices=ALL_KINDS)
    p.add_argument("--queries", type=int, default=1000, help="queries for recall and batch QPS")
    p.add_argument("--latency-queries", type=int, default=200, help="single queries timed for p50/p99")
    p.add_argument("--query-cos", type=float, default=0.7, help="cosine of a query with its source vector")
    p.add_argument("--data", choices=["uniform", "lowrank"], default="uniform",
                   help="uniform: isotropic on the sphere (no structure: the hard case for IVF/HNSW); "
                        "lowrank: 90%% of each vector in a random --rank-dim subspace")
    p.add_argument("--rank", type=int, default=64, help="subspace dimension for --data lowrank")
    p.add_argument("--nlist", type=int, help="IVF lists (default: each kind's, see index.search)")
    p.add_argument("--pq-m", type=int, help="PQ sub-quantizers (default dim/8)")
    p.add_argument("--nprobe", type=int, nargs="+", default=[16, 32, 64, 128, 256, 512])
    p.add_argument("--k-factor", type=int, nargs="+", default=[4, 8, 16], help="re-ranked candidates per result")
    p.add_argument("--ef-search", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    p.add_argument("--target-recall", type=float, default=0.99)
    p.add_argument("--threads", type=int, default=0, help="faiss OpenMP threads for build and batch (0 = all)")
    p.add_argument("--latency-threads", type=int, default=1,
                   help="OpenMP threads while timing single queries (1: one query per core, as served)")
    p.add_argument("--hnsw-max-size", type=float, default=2e5,
                   help="skip the HNSW kinds above this size (their build is ~ms per vector on a small CPU)")
    p.add_argument("--max-vectors-gb", type=float, default=6.0,
                   help="skip kinds whose stored vectors (4 or 1 byte per dimension) exceed this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help="where the results JSON goes")
    p.add_argument("--tag", default="", help="appended to the results name: search-<data>[-<tag>]-<device>.json")
    return p.parse_args(argv)


# ---------------------------------------------------------------- data, in chunks


def _basis(d, rank, seed):
    rng = np.random.default_rng([seed, 1 << 30])
    return np.linalg.qr(rng.standard_normal((d, rank)))[0].T.astype(np.float32)


def _sample(rng, n: int, d: int, data: str, basis):
    """``n`` unit vectors: isotropic (``uniform``) or mostly inside a random subspace (``lowrank``)."""
    from facefuse.index.search import normalize

    if data == "uniform":
        return normalize(rng.standard_normal((n, d), dtype=np.float32))
    z = rng.standard_normal((n, basis.shape[0]), dtype=np.float32) @ basis
    iso = rng.standard_normal((n, d), dtype=np.float32)
    return normalize(np.sqrt(0.9) * normalize(z) + np.sqrt(0.1) * normalize(iso))


def chunks(n, d, data, rank, seed):
    """``(start, block)`` of the gallery, the same on every pass (one seed per chunk)."""
    basis = _basis(d, rank, seed) if data == "lowrank" else None
    for c, s in enumerate(range(0, n, CHUNK)):
        yield s, _sample(np.random.default_rng([seed, c]), min(CHUNK, n - s), d, data, basis)


def train_rows(n, d, args) -> int:
    """Rows the requested kinds train on (kept for the whole run, so counted in ``rss_gb``)."""
    from facefuse.index import search as S

    need = 0
    for kind in args.kinds:
        if kind in ("flat", "hnsw"):
            continue
        p = S.resolve_params(kind, n, d, {"nlist": args.nlist} if "nlist" in S.KINDS.get(kind).build_params else {})
        need = max(need, S.SQ_TRAIN_POINTS if kind != "ivf" else 0,
                   S.IVF_TRAIN_POINTS_PER_LIST * p.get("nlist", 0))
    return min(n, max(need, 1))


def make_queries(n, d, args):
    """Queries at cosine ``query_cos`` to random gallery rows, the exact top-1 of each, and a
    training sample (the first rows: the data are i.i.d.)."""
    from facefuse.index.search import normalize

    TRAIN_ROWS = train_rows(n, d, args)
    rng = np.random.default_rng([args.seed, 1 << 31])
    src = rng.integers(0, n, args.queries)
    basis = _basis(d, args.rank, args.seed) if args.data == "lowrank" else None
    xs = np.empty((args.queries, d), np.float32)
    train = []
    for s, block in chunks(n, d, args.data, args.rank, args.seed):
        hit = (src >= s) & (src < s + len(block))
        xs[hit] = block[src[hit] - s]
        if s < TRAIN_ROWS:
            train.append(block[:TRAIN_ROWS - s])
    noise = _sample(rng, args.queries, d, args.data, basis)
    noise = normalize(noise - np.sum(noise * xs, 1, keepdims=True) * xs)  # orthogonal to the source
    xq = normalize(args.query_cos * xs + np.sqrt(1 - args.query_cos ** 2) * noise)
    best = np.full(args.queries, -np.inf, np.float32)
    gt = np.full(args.queries, -1, np.int64)
    for s, block in chunks(n, d, args.data, args.rank, args.seed):  # exact top-1, chunk by chunk
        sims = xq @ block.T
        j = sims.argmax(1)
        v = sims[np.arange(len(xq)), j]
        better = v > best
        best[better], gt[better] = v[better], s + j[better]
    return xq, gt, np.concatenate(train)


# ---------------------------------------------------------------- measuring


def rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2 ** 30


def build(kind, n, d, train, args):
    from facefuse.index import search as S

    params = S.resolve_params(kind, n, d, {k: v for k, v in (("nlist", args.nlist), ("pq_m", args.pq_m))
                                           if k in S.KINDS.get(kind).build_params})
    gc.collect()
    before = rss_gb()
    index = S.new_index(kind, d, params, args.seed)
    t = time.perf_counter()
    sample = S.train_sample(train, kind, params, args.seed)
    if sample is not None:
        index.train(sample)
    spent = time.perf_counter() - t
    for _, block in chunks(n, d, args.data, args.rank, args.seed):
        t = time.perf_counter()
        index.add(block)
        spent += time.perf_counter() - t
    return index, params, spent, rss_gb(), rss_gb() - before


def latency(index, xq, n_lat: int, threads: int, **params):
    import faiss

    from facefuse.index.search import search

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads)
    times = []
    try:
        for i in range(n_lat):
            t = time.perf_counter()
            search(index, xq[i:i + 1], 1, use_gpu=False, **params)
            times.append(time.perf_counter() - t)
    finally:
        faiss.omp_set_num_threads(before)
    t = np.array(times) * 1e3
    return float(np.percentile(t, 50)), float(np.percentile(t, 99))


def sweep(kind, params, args):
    """The search settings tried for ``kind``: dicts of search parameters."""
    if kind in ("ivfpq", "ivfpq-sq8"):
        probes = sorted({min(p, params["nlist"]) for p in args.nprobe})
        return [{"nprobe": p, "k_factor": k} for p, k in itertools.product(probes, args.k_factor)]
    if kind == "ivf":
        return [{"nprobe": p} for p in sorted({min(p, params["nlist"]) for p in args.nprobe})]
    if kind in ("hnsw", "hnsw-sq8"):
        return [{"ef_search": e} for e in args.ef_search]
    return [{}]


def run_kind(kind, n, d, xq, gt, train, args):
    from facefuse.index.search import search

    index, params, build_s, rss, index_gb = build(kind, n, d, train, args)
    rows = []
    for sp in sweep(kind, params, args):
        search(index, xq[:10], 1, use_gpu=False, **sp)  # warm-up
        t = time.perf_counter()
        _, I = search(index, xq, 1, use_gpu=False, **sp)
        qps = len(xq) / (time.perf_counter() - t)
        recall = float(np.mean(I[:, 0] == gt))
        p50, p99 = latency(index, xq, args.latency_queries, args.latency_threads, **sp)
        build_desc = ",".join(f"{k}={v}" for k, v in params.items() if k in ("nlist", "pq_m", "hnsw_m"))
        rows.append({"n": n, "dim": d, "kind": kind, "build": build_desc or "-",
                     "param": ",".join(f"{k}={v}" for k, v in sp.items()) or "-", "build_s": build_s,
                     "rss_gb": rss, "index_gb": index_gb, "p50_ms": p50, "p99_ms": p99, "batch_qps": qps,
                     "recall@1": recall, "tuned": "", "load_avg_1m": os.getloadavg()[0]})
    ok = [r for r in rows if r["recall@1"] >= args.target_recall]
    if ok:
        min(ok, key=lambda r: r["p50_ms"])["tuned"] = "yes"
    del index
    gc.collect()
    return rows


COLUMNS = ["n", "dim", "kind", "build", "param", "build_s", "rss_gb", "index_gb", "p50_ms", "p99_ms", "batch_qps",
           "recall@1", "tuned"]


def skipped(kind, n, d, args) -> str | None:
    if kind in ("hnsw", "hnsw-sq8") and n > args.hnsw_max_size:
        return f"above --hnsw-max-size {args.hnsw_max_size:g}"
    stored = n * d * (1 if kind.endswith("sq8") else 4) / 2 ** 30
    if stored > args.max_vectors_gb:
        return f"its vectors take {stored:.1f} GB > --max-vectors-gb {args.max_vectors_gb:g}"
    return None


def main(argv=None):
    args = parse_args(argv)
    import faiss

    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    device = device_name("cuda" if faiss.get_num_gpus() > 0 else "cpu")
    results = []
    for n in (int(s) for s in args.sizes):
        t = time.perf_counter()
        xq, gt, train = make_queries(n, args.dim, args)
        print(f"n={n} d={args.dim} {args.data}: queries and exact neighbours in {time.perf_counter() - t:.1f} s")
        for kind in args.kinds:
            why = skipped(kind, n, args.dim, args)
            if why:
                print(f"n={n}: {kind} skipped ({why})")
                continue
            rows = run_kind(kind, n, args.dim, xq, gt, train, args)
            print_table(rows, COLUMNS)
            results += rows
        del xq, gt, train
        gc.collect()
    print("\nall cases:")
    print_table(results, COLUMNS)
    settings = dict(vars(args))
    settings["faiss_threads"] = faiss.omp_get_max_threads()
    settings["faiss_gpus"] = faiss.get_num_gpus()
    settings["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    settings["out_dir"] = None  # no machine path in the results file
    path = write_results(f"search-{args.data}" + (f"-{args.tag}" if args.tag else ""), device, settings, results, args.out_dir)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
