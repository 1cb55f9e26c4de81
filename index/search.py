"""Nearest-neighbour search over embeddings, in the style of ``faiss.contrib``: plain functions over
float32 numpy arrays that return ``(D, I)``.

Similarity is the inner product of L2-normalised vectors, i.e. cosine. The index kinds (``KINDS``,
each a faiss ``index_factory`` string; ``n`` vectors of dimension ``d``):

``flat``       exact search (``Flat``).
``ivf``        ``IVF{nlist},Flat``, ``nlist ~ 4 sqrt(n)``; ``nprobe`` lists are visited per query.
``hnsw``       ``HNSW{hnsw_m},Flat``; ``ef_search`` candidates are kept per query.
``ivfpq``      ``IVF{nlist},PQ{pq_m}x4fs,RFlat``: 4-bit fast-scan PQ codes in ``nlist ~ sqrt(n)``
               lists, the best ``k * k_factor`` re-ranked exactly against the full vectors
               (scores are exact). ~4 d bytes per vector: 2 GB at 10^6 x 512.
``ivfpq-sq8``  ``IVF{nlist},PQ{pq_m}x4fs,Refine(SQ8)``: the same, re-ranked against 8-bit scalar
               quantised vectors (d bytes per vector: 2.6 GB at 10^7 x 256); scores within ~1e-2.
``hnsw-sq8``   ``HNSW{hnsw_m},SQ8``: a graph over 8-bit vectors; scores within ~1e-2.

``auto`` (:func:`auto_kind`) picks by gallery size: ``flat`` up to ``AUTO_FLAT_MAX`` vectors,
``ivfpq`` while the full vectors take at most ``AUTO_REFINE_FLAT_MAX_BYTES``, else ``ivfpq-sq8``.

Search parameters (``nprobe``, ``k_factor``, ``ef_search``) go in per call as faiss
``SearchParameters``, so a shared index is never mutated. Flat and IVF-Flat searches run on the GPU
when ``faiss.get_num_gpus() > 0`` (:func:`to_gpu` once, then search the copy).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator

import faiss
import numpy as np

from facefuse.core.vectors import l2_normalize as normalize  # the one L2-normalisation
from facefuse.core.registry import Registry

DEFAULT_NPROBE = 16
DEFAULT_EF_SEARCH = 64
DEFAULT_K_FACTOR = 8
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
# IVF k-means: at most 64 training points per list and 10 iterations. Enough for a good partition
# (recall depends on nprobe far more) and ~10x cheaper than faiss's defaults at 1e6 vectors.
IVF_TRAIN_POINTS_PER_LIST = 64
IVF_TRAIN_ITERATIONS = 10
PQ_MIN_TRAIN = 16                   # one training point per 4-bit centroid at the very least
SQ_TRAIN_POINTS = 65_536            # scalar-quantiser ranges / PQ codebooks need few points
ADD_CHUNK = 65_536                  # rows normalised and added at a time (bounded temporaries)
AUTO_FLAT_MAX = 50_000              # exact search below this: ~1 ms per query at d=512 on one core
AUTO_REFINE_FLAT_MAX_BYTES = 4 << 30  # full float32 vectors for re-ranking up to 4 GiB, else SQ8


@dataclass(frozen=True)
class Kind:
    """An index kind: its faiss factory string from ``(n, d, build params)`` and the search
    parameters it takes."""

    name: str
    factory: Callable[[int, int, dict], str]
    build_params: tuple[str, ...] = ()
    search_params: tuple[str, ...] = ()


KINDS: Registry[Kind] = Registry("index kind")
BUILD_PARAMS = ("nlist", "pq_m", "hnsw_m", "ef_construction")
SEARCH_PARAMS = ("nprobe", "k_factor", "ef_search")


def _register(name, factory, build=(), search=()):
    KINDS.register(name, Kind(name, factory, tuple(build), tuple(search)))


_register("flat", lambda n, d, p: "Flat")
_register("ivf", lambda n, d, p: f"IVF{p['nlist']},Flat", ["nlist"], ["nprobe"])
_register("hnsw", lambda n, d, p: f"HNSW{p['hnsw_m']},Flat", ["hnsw_m", "ef_construction"], ["ef_search"])
_register("ivfpq", lambda n, d, p: f"IVF{p['nlist']},PQ{p['pq_m']}x4fs,RFlat", ["nlist", "pq_m"],
          ["nprobe", "k_factor"])
_register("ivfpq-sq8", lambda n, d, p: f"IVF{p['nlist']},PQ{p['pq_m']}x4fs,Refine(SQ8)", ["nlist", "pq_m"],
          ["nprobe", "k_factor"])
_register("hnsw-sq8", lambda n, d, p: f"HNSW{p['hnsw_m']},SQ8", ["hnsw_m", "ef_construction"], ["ef_search"])


def as_float32(x) -> np.ndarray:
    """A C-contiguous float32 2-D copy-if-needed of ``x`` (what every faiss call wants)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D array of vectors, got shape {x.shape}")
    return x


def default_nlist(n: int, kind: str = "ivf") -> int:
    """``ivf``: ``4 sqrt(n)`` lists; the PQ kinds: ``sqrt(n)`` rounded to a power of two (fewer,
    longer lists suit fast-scan). At least 1 and at most ``n``."""
    if kind == "ivf":
        return max(1, min(n, int(round(4 * math.sqrt(n)))))
    return max(1, min(n, 2 ** int(round(math.log2(max(1.0, math.sqrt(n)))))))


def default_pq_m(d: int) -> int:
    """Sub-quantizers for the PQ kinds: the largest even divisor of ``d`` at most ``d / 8``
    (64 at d=512, 32 at d=256), i.e. 4 bits per 8 dimensions. The codes only shortlist
    ``k * k_factor`` candidates for re-ranking. At 10^6 x 512 recall@1 was set by the lists probed
    and PQ32 (d/16) scanned ~25% faster at the same recall; at 10^7 x 256 PQ16 (d/16) codes were too
    coarse for the shortlist (recall@1 0.81 at k_factor 8, 0.98 at 512) while PQ32 (d/8) gave 0.999
    at 7.1 ms p50, so the default keeps d/8 (bench_search, search-uniform-1e6*/1e7*-cpu2.json)."""
    for m in range(max(2, d // 8), 1, -1):
        if d % m == 0 and m % 2 == 0:
            return m
    raise ValueError(f"dimension {d} has no even divisor for PQ; use another index kind")


def default_nprobe(kind: str, nlist: int, nprobe: int | None = None) -> int:
    """IVF lists visited per query: ``nprobe`` if given, else :data:`DEFAULT_NPROBE` for ``ivf``
    (IVF-Flat scans are costly, so few lists) and 5/16 of the lists for the fast-scan PQ kinds (320
    of 1024: what recall@1 >= 0.99 took at 10^6 x 512, isotropic data at cosine 0.7; bench_search: a
    quarter gave 0.983, 5/16 0.992, a half 0.999; recall is set by the probed lists, not the codes);
    never more than ``nlist``."""
    default = DEFAULT_NPROBE if kind == "ivf" else max(1, (5 * nlist) // 16)
    return min(nprobe or default, nlist)


NPROBE_HELP = f"ivf: {DEFAULT_NPROBE}; ivfpq*: 5/16 of nlist"  # what default_nprobe decides, for help texts


def auto_kind(n: int, d: int) -> str:
    """The kind ``auto`` picks for ``n`` vectors of dimension ``d`` (see the module docstring)."""
    if n <= AUTO_FLAT_MAX:
        return "flat"
    return "ivfpq" if 4 * n * d <= AUTO_REFINE_FLAT_MAX_BYTES else "ivfpq-sq8"


def resolve_kind(kind: str, n: int, d: int, params: dict) -> tuple[str, dict]:
    """``(kind, parameters)`` with ``auto`` decided (:func:`auto_kind`) and every parameter filled in
    (:func:`resolve_params`): the one place a gallery's kind and defaults are chosen. For ``auto``,
    parameters the chosen kind does not take are dropped (a user asking for ``nprobe`` with ``auto``
    may get a flat index); for a named kind they are an error."""
    if kind == "auto":
        kind = auto_kind(n, d)
        spec = KINDS.get(kind)
        params = {k: v for k, v in params.items() if k in spec.build_params + spec.search_params}
    return kind, resolve_params(kind, n, d, params)


def resolve_params(kind: str, n: int, d: int, params: dict) -> dict:
    """Every build and search parameter of ``kind`` with defaults filled in (the record kept with
    an index). A parameter the kind does not take raises ``ValueError`` naming it."""
    spec = KINDS.get(kind)
    given = {k: v for k, v in params.items() if v is not None}
    unknown = set(given) - set(spec.build_params) - set(spec.search_params)
    if unknown:
        raise ValueError(f"index kind {kind!r} takes no parameter {', '.join(sorted(unknown))}; "
                         f"it takes: {', '.join(spec.build_params + spec.search_params) or 'none'}")
    out = {}
    if "nlist" in spec.build_params:
        out["nlist"] = given.get("nlist") or default_nlist(n, kind)
        if not 1 <= out["nlist"] <= n:
            raise ValueError(f"nlist must be in [1, {n}] for {n} vectors, got {out['nlist']}")
    if "pq_m" in spec.build_params:
        out["pq_m"] = given.get("pq_m") or default_pq_m(d)
        if d % out["pq_m"] or out["pq_m"] % 2:
            raise ValueError(f"pq_m must be even and divide the dimension {d}, got {out['pq_m']}")
        if n < PQ_MIN_TRAIN:
            raise ValueError(f"index kind {kind!r} needs at least {PQ_MIN_TRAIN} vectors to train its 4-bit "
                             f"codebooks, got {n}; use flat")
    if "hnsw_m" in spec.build_params:
        out["hnsw_m"] = given.get("hnsw_m") or HNSW_M
        out["ef_construction"] = given.get("ef_construction") or HNSW_EF_CONSTRUCTION
    if "nprobe" in spec.search_params:
        out["nprobe"] = default_nprobe(kind, out["nlist"], given.get("nprobe"))
    if "k_factor" in spec.search_params:
        out["k_factor"] = given.get("k_factor") or DEFAULT_K_FACTOR
    if "ef_search" in spec.search_params:
        out["ef_search"] = given.get("ef_search") or DEFAULT_EF_SEARCH
    return out


def iter_chunks(x, rows: int = ADD_CHUNK) -> Iterator[np.ndarray]:
    """Normalised float32 blocks of ``rows`` rows of ``x`` (an array or a memory-mapped .npy)."""
    for s in range(0, len(x), rows):
        yield normalize(x[s:s + rows])


def train_sample(x, kind: str, params: dict, seed: int = 0) -> np.ndarray | None:
    """The rows ``kind`` trains on (normalised; ``None`` for kinds without training): a seeded
    random subset, read in row order so a memory-mapped file is read forwards."""
    if kind in ("flat", "hnsw"):
        return None
    want = SQ_TRAIN_POINTS
    if "nlist" in params:
        want = max(want if kind != "ivf" else 0, IVF_TRAIN_POINTS_PER_LIST * params["nlist"])
    n = len(x)
    rows = np.arange(n) if want >= n else np.sort(np.random.default_rng(seed).choice(n, want, replace=False))
    return normalize(x[rows])


def new_index(kind: str, d: int, params: dict, seed: int = 0) -> faiss.Index:
    """An empty (untrained) index of ``kind`` for resolved ``params``."""
    spec = KINDS.get(kind)
    index = faiss.index_factory(d, spec.factory(0, d, params), faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.cp.seed = seed
        ivf.cp.min_points_per_centroid = 1  # small galleries: no warning, still a valid partition
        ivf.cp.max_points_per_centroid = IVF_TRAIN_POINTS_PER_LIST
        ivf.cp.niter = IVF_TRAIN_ITERATIONS
    hnsw = _hnsw(index)
    if hnsw is not None:
        hnsw.hnsw.efConstruction = params["ef_construction"]
    return index


def build_index(xb, kind: str = "flat", *, seed: int = 0, **params) -> faiss.Index:
    """A CPU index of ``kind`` holding the rows of ``xb`` (normalised here, in chunks, so ``xb``
    may be a memory-mapped file larger than memory allows twice).

    Trained kinds train on :func:`train_sample`; adding more vectors later needs no retraining.
    Build and search parameters are those of :func:`resolve_params` (search ones are ignored here).
    An unknown kind raises ``ValueError`` listing the valid ones."""
    n, d = xb.shape
    kind, p = resolve_kind(kind, n, d, params)
    index = new_index(kind, d, p, seed)
    sample = train_sample(xb, kind, p, seed)
    if sample is not None:
        index.train(sample)
    for block in iter_chunks(xb):
        index.add(block)
    return index


def _hnsw(index):
    index = faiss.downcast_index(index)
    return index if isinstance(index, faiss.IndexHNSW) else None


def index_kind(index: faiss.Index) -> str:
    """The :data:`KINDS` name of a faiss index built by :func:`build_index`."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexRefine):
        base = faiss.downcast_index(index.base_index)
        if isinstance(base, faiss.IndexIVFPQFastScan):
            return "ivfpq" if isinstance(faiss.downcast_index(index.refine_index), faiss.IndexFlat) else "ivfpq-sq8"
    if isinstance(index, faiss.IndexFlat):
        return "flat"
    if isinstance(index, faiss.IndexHNSWSQ):
        return "hnsw-sq8"
    if isinstance(index, faiss.IndexHNSW):
        return "hnsw"
    if isinstance(index, faiss.IndexIVFFlat):
        return "ivf"
    raise ValueError(f"unsupported faiss index type {type(index).__name__}")


def search_parameters(index: faiss.Index, *, nprobe: int | None = None, k_factor: int | None = None,
                      ef_search: int | None = None) -> faiss.SearchParameters | None:
    """The faiss ``SearchParameters`` for ``index`` (``None`` values: the kind's defaults);
    options the kind does not take are ignored."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexRefine):
        base = search_parameters(index.base_index, nprobe=nprobe, ef_search=ef_search)
        return faiss.IndexRefineSearchParameters(k_factor=float(k_factor or DEFAULT_K_FACTOR),
                                                 base_index_params=base)
    if isinstance(index, faiss.IndexIVF):
        kind = "ivf" if isinstance(index, faiss.IndexIVFFlat) else "ivfpq"
        return faiss.SearchParametersIVF(nprobe=default_nprobe(kind, index.nlist, nprobe))
    if isinstance(index, faiss.IndexHNSW):
        return faiss.SearchParametersHNSW(efSearch=ef_search or DEFAULT_EF_SEARCH)
    return None


def gpu_capable(index: faiss.Index) -> bool:
    """Whether faiss can copy ``index`` to a GPU (flat and IVF-Flat; not fast-scan nor HNSW)."""
    return index_kind(index) in ("flat", "ivf")


def is_gpu_index(index) -> bool:
    return type(index).__name__.startswith("Gpu")


def to_gpu(index: faiss.Index) -> faiss.Index:
    """A copy of ``index`` on every GPU faiss sees (do this once and search the copy)."""
    return faiss.index_cpu_to_all_gpus(index)


def search(index: faiss.Index, xq, k: int, *, nprobe: int | None = None, k_factor: int | None = None,
           ef_search: int | None = None, use_gpu: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` ``(D, I)``: D the inner products (float32, descending), I the row ids (int64,
    -1 where fewer than ``k`` vectors were found). By default on the GPU when faiss sees one and
    the kind runs there: pass an index already copied with :func:`to_gpu` to avoid a copy per call."""
    xq = as_float32(xq)
    if is_gpu_index(index):
        if nprobe is not None and "IVF" in type(index).__name__:
            faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", nprobe)
        return index.search(xq, k)
    if use_gpu is None:
        use_gpu = faiss.get_num_gpus() > 0
    if use_gpu and gpu_capable(index):
        if index_kind(index) == "ivf":
            nprobe = search_parameters(index, nprobe=nprobe).nprobe
        return search(to_gpu(index), xq, k, nprobe=nprobe)
    params = search_parameters(index, nprobe=nprobe, k_factor=k_factor, ef_search=ef_search)
    return index.search(xq, k, params=params) if params is not None else index.search(xq, k)


def knn_numpy(xb, xq, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force exact inner-product top-``k`` in numpy (float64 accumulation): the reference."""
    sims = as_float32(xq).astype(np.float64) @ as_float32(xb).astype(np.float64).T
    k = min(k, sims.shape[1])
    part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(sims, part, 1), axis=1, kind="stable")
    idx = np.take_along_axis(part, order, 1)
    return np.take_along_axis(sims, idx, 1), idx


def search_identities(index: faiss.Index, xq, labels: np.ndarray, k: int, *, use_gpu: bool | None = None,
                      **params):
    """Top-``k`` distinct identities per query, scored by their best-matching vector.

    ``labels[i]`` is the identity id (int) of row ``i``. Neighbours are fetched in growing
    batches until ``k`` distinct identities are seen (or the index is exhausted), so with an exact
    index the result equals the top-``k`` of the per-identity maximum score. The index is copied to
    the GPU at most once (pass a :func:`to_gpu` copy to reuse one across calls).
    Returns ``(S, L, R)``: scores (float32), identity ids and the best row of each (int64, -1 pad).
    """
    xq = as_float32(xq)
    labels = np.asarray(labels)
    n = index.ntotal
    if use_gpu is None:
        use_gpu = faiss.get_num_gpus() > 0
    if use_gpu and not is_gpu_index(index) and gpu_capable(index):
        if index_kind(index) == "ivf":
            params["nprobe"] = search_parameters(index, nprobe=params.get("nprobe")).nprobe
        index = to_gpu(index)
    nq = xq.shape[0]
    S = np.full((nq, k), -np.inf, dtype=np.float32)
    L = np.full((nq, k), -1, dtype=np.int64)
    R = np.full((nq, k), -1, dtype=np.int64)
    todo = np.arange(nq)
    fetch = min(n, 4 * k)
    while todo.size:
        D, I = search(index, xq[todo], fetch, use_gpu=use_gpu, **params)
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
