"""Nearest-neighbour search over embeddings, in the style of ``faiss.contrib``: plain functions over
float32 numpy arrays that return ``(D, I)``.

Similarity is the inner product of L2-normalised vectors, i.e. cosine. Three index kinds:

``flat``  exact search (``IndexFlatIP``), the default.
``ivf``   ``IndexIVFFlat`` with ``nlist ~ 4 * sqrt(n)`` lists; ``nprobe`` lists are visited per query.
``hnsw``  ``IndexHNSWFlat`` with ``M = 32``; ``ef_search`` candidates are kept per query.

Flat and IVF searches run on the GPU when ``faiss.get_num_gpus() > 0`` (HNSW has no GPU version).
"""

from __future__ import annotations

import math

import faiss
import numpy as np

from facefuse.core.embed import l2_normalize as normalize  # noqa: F401  (the one L2-normalisation)

KINDS = ("flat", "ivf", "hnsw")
DEFAULT_NPROBE = 16
DEFAULT_EF_SEARCH = 64
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
# IVF k-means: at most 64 training points per list and 10 iterations. Enough for a good partition
# (recall depends on nprobe far more) and ~10x cheaper than faiss's defaults at 1e6 vectors.
IVF_TRAIN_POINTS_PER_LIST = 64
IVF_TRAIN_ITERATIONS = 10


def as_float32(x) -> np.ndarray:
    """A C-contiguous float32 2-D copy-if-needed of ``x`` (what every faiss call wants)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D array of vectors, got shape {x.shape}")
    return x


def default_nlist(n: int) -> int:
    """``4 * sqrt(n)`` inverted lists, at least 1 and at most ``n``."""
    return max(1, min(n, int(round(4 * math.sqrt(n)))))


def build_index(xb, kind: str = "flat", *, nlist: int | None = None, hnsw_m: int = HNSW_M,
                ef_construction: int = HNSW_EF_CONSTRUCTION, seed: int = 0) -> faiss.Index:
    """A CPU index of kind ``kind`` holding the rows of ``xb`` (expected L2-normalised).

    IVF is trained on ``xb`` itself (k-means with ``seed`` on a sample of at most
    ``IVF_TRAIN_POINTS_PER_LIST * nlist`` rows); adding more vectors later needs no retraining. An unknown kind raises ``ValueError`` listing the valid ones.
    """
    xb = as_float32(xb)
    n, d = xb.shape
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "ivf":
        nl = nlist or default_nlist(n)
        if not 1 <= nl <= n:
            raise ValueError(f"nlist must be in [1, {n}] for {n} vectors, got {nl}")
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nl, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        index.cp.min_points_per_centroid = 1  # small galleries: no warning, still a valid partition
        index.cp.max_points_per_centroid = IVF_TRAIN_POINTS_PER_LIST
        index.cp.niter = IVF_TRAIN_ITERATIONS
        index.train(xb)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
    else:
        raise ValueError(f"unknown index kind {kind!r}; valid: {', '.join(KINDS)}")
    index.add(xb)
    return index


def index_kind(index: faiss.Index) -> str:
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexFlat):
        return "flat"
    if isinstance(index, faiss.IndexIVF):
        return "ivf"
    if isinstance(index, faiss.IndexHNSW):
        return "hnsw"
    raise ValueError(f"unsupported faiss index type {type(index).__name__}")


def set_search_params(index: faiss.Index, *, nprobe: int | None = None,
                      ef_search: int | None = None) -> None:
    """Apply ``nprobe`` (IVF) / ``ef_search`` (HNSW); options for the other kinds are ignored."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexIVF):
        index.nprobe = min(nprobe or DEFAULT_NPROBE, index.nlist)
    elif isinstance(index, faiss.IndexHNSW):
        index.hnsw.efSearch = ef_search or DEFAULT_EF_SEARCH


def search(index: faiss.Index, xq, k: int, *, nprobe: int | None = None,
           ef_search: int | None = None, use_gpu: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` ``(D, I)``: D the inner products (float32, descending), I the row ids (int64,
    -1 where fewer than ``k`` vectors were found). GPU by default when faiss sees one."""
    xq = as_float32(xq)
    set_search_params(index, nprobe=nprobe, ef_search=ef_search)
    if use_gpu is None:
        use_gpu = faiss.get_num_gpus() > 0
    if use_gpu and index_kind(index) != "hnsw":
        index = faiss.index_cpu_to_all_gpus(index)  # copies nprobe along with the lists
    return index.search(xq, k)


def knn_numpy(xb, xq, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force exact inner-product top-``k`` in numpy (float64 accumulation): the reference."""
    sims = as_float32(xq).astype(np.float64) @ as_float32(xb).astype(np.float64).T
    k = min(k, sims.shape[1])
    part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(sims, part, 1), axis=1, kind="stable")
    idx = np.take_along_axis(part, order, 1)
    return np.take_along_axis(sims, idx, 1), idx


def search_identities(index: faiss.Index, xq, labels: np.ndarray, k: int, **params):
    """Top-``k`` distinct identities per query, scored by their best-matching vector.

    ``labels[i]`` is the identity id (int) of row ``i``. Neighbours are fetched in growing
    batches until ``k`` distinct identities are seen (or the index is exhausted), so with an exact
    index the result equals the top-``k`` of the per-identity maximum score.
    Returns ``(S, L, R)``: scores (float32), identity ids and the best row of each (int64, -1 pad).
    """
    xq = as_float32(xq)
    labels = np.asarray(labels)
    n = index.ntotal
    nq = xq.shape[0]
    S = np.full((nq, k), -np.inf, dtype=np.float32)
    L = np.full((nq, k), -1, dtype=np.int64)
    R = np.full((nq, k), -1, dtype=np.int64)
    todo = np.arange(nq)
    fetch = min(n, 4 * k)
    while todo.size:
        D, I = search(index, xq[todo], fetch, **params)
        again = []
        for row, q in enumerate(todo):
            seen = 0
            got: set[int] = set()
            for score, i in zip(D[row], I[row]):
                if i < 0 or labels[i] in got:
                    continue
                got.add(labels[i])
                S[q, seen], L[q, seen], R[q, seen] = score, labels[i], i
                seen += 1
                if seen == k:
                    break
            if seen < k and fetch < n:
                again.append(q)
        todo = np.array(again, dtype=np.int64)
        fetch = min(n, fetch * 4)
    return S, L, R
