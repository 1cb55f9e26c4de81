"""Large-gallery pieces of index/: the compressed kinds against numpy brute force, ``auto``,
galleries from precomputed embeddings (one file, shards, every labels format), enrolling without a
rebuild, concurrent writers in separate processes (nothing lost, readers never see a half-written
gallery), the consistency check on open, the GPU copy made once, and bad input on the CLI."""

import json
import multiprocessing as mp
import os
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pytest

from helpers import assert_one_line_error, run_cli

from facefuse.core.errors import FacefuseError
from facefuse.index import search as S
from facefuse.index.enroll import (add_embeddings_to_index_folder, build_index_folder_from_embeddings, load_embeddings,
                                   read_labels)
from facefuse.index.gallery import build_gallery, load_gallery, read_meta, save_gallery, search_gallery

NEW_KINDS = ["ivfpq", "ivfpq-sq8", "hnsw-sq8"]
SCORE_ATOL = {"ivfpq": 1e-5, "ivfpq-sq8": 2e-2, "hnsw-sq8": 2e-2}  # exact re-ranking vs 8-bit codes


def _data(n, d, nq, seed, cos=0.7):
    """Isotropic unit vectors and queries at cosine ``cos`` to a random one of them (a new photo of
    an enrolled face), as benchmarks/bench_search.py makes them."""
    rng = np.random.default_rng(seed)
    xb = S.normalize(rng.standard_normal((n, d)))
    src = rng.integers(0, n, nq)
    noise = rng.standard_normal((nq, d)).astype(np.float32)
    noise = S.normalize(noise - np.sum(noise * xb[src], 1, keepdims=True) * xb[src])
    return xb, S.normalize(cos * xb[src] + np.sqrt(1 - cos ** 2) * noise)


# ---------------------------------------------------------------- kinds against brute force


@pytest.mark.parametrize("kind", NEW_KINDS)
@pytest.mark.parametrize("n,d", [(2000, 64), (5003, 96)])
def test_compressed_kinds_vs_brute_force(kind, n, d):
    xb, xq = _data(n, d, 200, seed=n)
    index = S.build_index(xb, kind)
    assert index.ntotal == n and S.index_kind(index) == kind
    params = dict(nprobe=10 ** 6, k_factor=16, ef_search=256)  # every list probed: only PQ/graph error left
    D, I = S.search(index, xq, 5, **params)
    Dr, Ir = S.knn_numpy(xb, xq, 5)
    assert np.mean(I[:, 0] == Ir[:, 0]) >= 0.99
    sims = xq.astype(np.float64) @ xb.astype(np.float64).T
    # the scores are those of the rows found: exact after flat re-ranking, 8-bit close otherwise
    np.testing.assert_allclose(D, np.take_along_axis(sims, I, 1), atol=SCORE_ATOL[kind], rtol=0)
    hit = I[:, 0] == Ir[:, 0]
    np.testing.assert_allclose(D[hit, 0], Dr[hit, 0], atol=SCORE_ATOL[kind], rtol=0)


def test_ivfpq_parameters_trade_recall():
    xb, xq = _data(8000, 64, 300, seed=1)
    index = S.build_index(xb, "ivfpq", nlist=64, pq_m=16)
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    assert isinstance(ivf, faiss.IndexIVFPQFastScan) and ivf.nlist == 64 and ivf.pq.M == 16
    gt = S.knn_numpy(xb, xq, 1)[1][:, 0]
    recall = lambda **p: np.mean(S.search(index, xq, 1, **p)[1][:, 0] == gt)  # noqa: E731
    assert recall(nprobe=1, k_factor=1) < recall(nprobe=64, k_factor=64) == 1.0


def test_defaults_and_auto_rule():
    assert S.default_pq_m(512) == 64 and S.default_pq_m(256) == 32 and S.default_pq_m(24) == 2
    assert S.default_nlist(10 ** 6, "ivfpq") == 1024 and S.default_nlist(10 ** 7, "ivfpq") == 4096
    assert S.auto_kind(S.AUTO_FLAT_MAX, 512) == "flat"
    assert S.auto_kind(10 ** 6, 512) == "ivfpq"          # 2 GB of full vectors for re-ranking
    assert S.auto_kind(10 ** 7, 256) == "ivfpq-sq8"      # 10 GB would not fit: 8-bit re-ranking
    p = S.resolve_params("ivfpq", 10 ** 6, 512, {})
    assert p == {"nlist": 1024, "pq_m": 64, "nprobe": 320, "k_factor": S.DEFAULT_K_FACTOR}
    with pytest.raises(ValueError, match="takes no parameter nprobe"):
        S.resolve_params("flat", 10, 8, {"nprobe": 3})
    with pytest.raises(ValueError, match="pq_m must be even and divide the dimension 64"):
        S.resolve_params("ivfpq", 1000, 64, {"pq_m": 6})
    with pytest.raises(ValueError, match="unknown index kind 'lsh'; valid: flat, ivf, hnsw, ivfpq"):
        S.resolve_params("lsh", 10, 8, {})


def test_auto_gallery_picks_by_size_and_stores_search_params(tmp_path, monkeypatch):
    monkeypatch.setattr(S, "AUTO_FLAT_MAX", 1000)
    xb, xq = _data(3000, 64, 100, seed=2)
    ids = [f"id{i}" for i in range(len(xb))]
    small = build_gallery(xb[:500], ids[:500], [""] * 500, {}, "auto", nprobe=3)
    assert small.kind == "flat" and small.params == {}
    g = build_gallery(xb, ids, [""] * len(xb), {}, "auto", nprobe=3)
    assert g.kind == "ivfpq" and g.params["nprobe"] == 3 and g.params["nlist"] == 64
    save_gallery(g, tmp_path / "idx")
    meta = read_meta(tmp_path / "idx")
    assert meta["kind"] == "ivfpq" and meta["params"]["nprobe"] == 3
    loaded = load_gallery(tmp_path / "idx")
    gt = S.knn_numpy(xb, xq, 1)[1][:, 0]
    low = np.mean([r["identity"] == ids[t] for r, t in zip(search_gallery(loaded, xq, 1), gt)])
    full = np.mean([r["identity"] == ids[t] for r, t in zip(search_gallery(loaded, xq, 1, nprobe=64, k_factor=32), gt)])
    assert low < full == 1.0  # the stored nprobe is used; an explicit one overrides it


# ---------------------------------------------------------------- from embeddings


def _write_labels(path: Path, ids, paths=None):
    if path.suffix == ".txt":
        path.write_text("".join(f"{i}\n" for i in ids))
    elif path.suffix == ".json":
        path.write_text(json.dumps({"identities": ids, "paths": paths} if paths else ids))
    else:
        np.save(path, np.array(ids if paths is None else list(zip(ids, paths)), dtype=str))
    return path


@pytest.mark.parametrize("fmt", ["txt", "json", "json-paths", "npy", "npy-paths"])
def test_labels_formats(tmp_path, fmt):
    ids, paths = ["ann", "bob", "Jo Ann"], ["a.jpg", "b.jpg", "c.jpg"]
    with_paths = fmt.endswith("paths")
    f = _write_labels(tmp_path / f"labels.{fmt.split('-')[0]}", ids, paths if with_paths else None)
    assert read_labels(f, 3) == (ids, paths if with_paths else [""] * 3)
    with pytest.raises(FacefuseError, match=r"labels.* 3 labels/paths for 4 embedding rows in E.npy"):
        read_labels(f, 4, "E.npy")


@pytest.mark.parametrize("kind", ["flat", "ivfpq"])
def test_build_from_embeddings_and_shards_equals_build_from_vectors(tmp_path, kind):
    x = np.random.default_rng(3).standard_normal((3001, 48)).astype(np.float32)  # not normalised: done here
    ids = [f"p{i % 97}" for i in range(len(x))]
    np.save(tmp_path / "emb.npy", x)
    shards = tmp_path / "shards"
    shards.mkdir()
    for j, s in enumerate(range(0, len(x), 700)):  # names sort in row order; 5 shards, the last short
        np.save(shards / f"part-{j:05d}.npy", x[s:s + 700])
    labels = _write_labels(tmp_path / "labels.txt", ids)
    ref = build_gallery(x, ids, [""] * len(x), {}, kind)
    xq = _data(100, 48, 50, seed=4)[0]
    want = search_gallery(ref, xq, 3)
    for source in (tmp_path / "emb.npy", shards):
        out = tmp_path / f"idx-{source.name}"
        build_index_folder_from_embeddings(source, labels, out, kind=kind)
        g = load_gallery(out)
        assert g.kind == kind and g.identities == ids and g.model["fingerprint"] is None
        assert search_gallery(g, xq, 3) == want
    rows = load_embeddings(shards)
    np.testing.assert_array_equal(rows[np.array([0, 699, 700, 3000])], x[[0, 699, 700, 3000]])
    np.testing.assert_array_equal(rows[1390:1410], x[1390:1410])


@pytest.mark.parametrize("kind", S.KINDS.names())
def test_add_after_build_keeps_the_trained_index(tmp_path, kind):
    xb, xq = _data(4000, 64, 100, seed=5)
    ids = [f"id{i}" for i in range(len(xb))]
    g = build_gallery(xb[:3000], ids[:3000], [""] * 3000, {}, kind)
    save_gallery(g, tmp_path / "idx")
    ivf = faiss.try_extract_index_ivf(g.index)
    centroids = faiss.vector_to_array(faiss.downcast_index(ivf.quantizer).codes) if ivf else None
    np.save(tmp_path / "more.npy", xb[3000:])
    _write_labels(tmp_path / "more.txt", ids[3000:])
    _, added = add_embeddings_to_index_folder(tmp_path / "idx", tmp_path / "more.npy", tmp_path / "more.txt")
    again = load_gallery(tmp_path / "idx")
    assert added == 1000 and len(again) == 4000 and again.identities == ids and again.kind == kind
    if ivf is not None:
        after = faiss.extract_index_ivf(again.index)
        np.testing.assert_array_equal(centroids, faiss.vector_to_array(faiss.downcast_index(after.quantizer).codes))
    gt = S.knn_numpy(xb, xq, 1)[1][:, 0]
    res = search_gallery(again, xq, 1, nprobe=10 ** 6, k_factor=32, ef_search=256)
    assert np.mean([r["identity"] == ids[t] for r, t in zip(res, gt)]) >= 0.99
    # the add wrote only its rows: the index file is untouched, the vectors went to the journal
    assert sorted(p.name for p in (tmp_path / "idx").glob("*-0*")) == ["index-000001.faiss", "journal-000001.f32"]


# ---------------------------------------------------------------- concurrent writers, readers


import gallery_workers  # noqa: E402  (writer/reader processes, in a module spawn can import quickly)
from gallery_workers import ADDS, DIM, ROWS, WRITERS  # noqa: E402


def test_concurrent_adds_lose_nothing_and_readers_never_fail(tmp_path):
    folder = tmp_path / "idx"
    seed = S.normalize(np.random.default_rng(0).standard_normal((40, DIM)))
    save_gallery(build_gallery(seed, ["seed"] * 40, [""] * 40, {}, "ivfpq", nlist=2, pq_m=4), folder)
    ctx = mp.get_context("spawn")  # real separate interpreters (no forked faiss/OpenMP state)
    start, stop, out = ctx.Barrier(WRITERS + 2), ctx.Event(), ctx.Queue()  # all start writing at once
    writers = [ctx.Process(target=gallery_workers.writer, args=(str(folder), w, start)) for w in range(WRITERS)]
    reader = ctx.Process(target=gallery_workers.reader, args=(str(folder), start, stop, out))
    for p in writers + [reader]:
        p.start()
    start.wait(timeout=300)
    for p in writers:
        p.join(120)
        assert p.exitcode == 0
    stop.set()
    reads, errors = out.get(timeout=60)
    reader.join(60)
    assert not errors and reads > 0
    g = load_gallery(folder)
    assert len(g) == 40 + WRITERS * ADDS * ROWS
    assert sorted(g.identities) == sorted(["seed"] * 40 + [f"writer{w}" for w in range(WRITERS)] * ADDS * ROWS)
    assert [p.name for p in folder.glob("index-*.faiss")] == ["index-000001.faiss"]  # adds were journalled


def test_cli_adds_started_at_once(tmp_path):
    """The fault as reported: four `facefuse index add` processes on one gallery at once."""
    x = np.random.default_rng(7).standard_normal((40, DIM)).astype(np.float32)
    np.save(tmp_path / "e.npy", x[:12])
    _write_labels(tmp_path / "l.txt", ["base"] * 12)
    assert run_cli("index", "build", "--embeddings", tmp_path / "e.npy", "--labels", tmp_path / "l.txt",
                   "-o", tmp_path / "idx").exit_code == 0
    procs = []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for w in range(4):
        np.save(tmp_path / f"e{w}.npy", x[12 + 7 * w:19 + 7 * w])
        _write_labels(tmp_path / f"l{w}.txt", [f"new{w}"] * 7)
        procs.append(subprocess.Popen([sys.executable, "-m", "facefuse.cli", "index", "add", str(tmp_path / "idx"),
                                       "--embeddings", str(tmp_path / f"e{w}.npy"), "--labels",
                                       str(tmp_path / f"l{w}.txt")], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE))
    for p in procs:
        assert p.wait(120) == 0, p.stderr.read()
    g = load_gallery(tmp_path / "idx")
    assert len(g) == 40 and sorted(set(g.identities)) == ["base", "new0", "new1", "new2", "new3"]


def test_open_refuses_index_and_meta_out_of_step(tmp_path):
    x = S.normalize(np.random.default_rng(8).standard_normal((20, 8)))
    g = build_gallery(x, ["a"] * 20, [""] * 20, {}, "flat")
    save_gallery(g, tmp_path / "idx")
    meta = read_meta(tmp_path / "idx")
    bigger = faiss.IndexFlatIP(8)
    bigger.add(np.r_[x, x[:3]])
    faiss.write_index(bigger, str(tmp_path / "idx" / meta["index_file"]))
    with pytest.raises(FacefuseError, match=r"idx: index-000001.faiss holds 23 8-d vectors but gallery.db lists 20"):
        load_gallery(tmp_path / "idx")
    assert_one_line_error(run_cli("index", "add", tmp_path / "idx", "--embeddings", tmp_path / "nope.npy",
                                  "--labels", tmp_path / "nope.txt"), "nope.npy")
    np.save(tmp_path / "e.npy", x[:2])
    _write_labels(tmp_path / "l.txt", ["b", "b"])
    assert_one_line_error(run_cli("index", "add", tmp_path / "idx", "--embeddings", tmp_path / "e.npy",
                                  "--labels", tmp_path / "l.txt"), "idx",
                          "holds 23 8-d vectors but gallery.db lists 20")


# ---------------------------------------------------------------- GPU copy made once


class _FakeGpu:
    """Stands in for a faiss GPU index (its class name starts with Gpu) and counts searches."""

    def __init__(self, index):
        self.index, self.searches = index, 0

    @property
    def ntotal(self):
        return self.index.ntotal

    def search(self, xq, k):
        self.searches += 1
        return self.index.search(xq, k)


def test_gpu_copy_is_made_once_per_gallery_state(monkeypatch):
    made = []
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    monkeypatch.setattr(S, "to_gpu", lambda index: made.append(type("GpuFake", (_FakeGpu,), {})(index)) or made[-1])
    x, xq = _data(300, 16, 20, seed=9)
    ids = [str(i % 30) for i in range(300)]  # few identities: search_identities fetches in rounds
    g = build_gallery(x, ids, [""] * 300, {}, "flat")
    search_gallery(g, xq, 25)
    search_gallery(g, xq, 25)
    assert len(made) == 1 and made[0].searches >= 2
    g.add(x[:5], ["new"] * 5, [""] * 5)
    res = search_gallery(g, x[:1], 1)
    assert len(made) == 2 and made[1].index.ntotal == 305 and res[0]["score"] == pytest.approx(1, abs=1e-5)
    hnsw = build_gallery(x, ids, [""] * 300, {}, "hnsw-sq8")
    search_gallery(hnsw, xq, 3)
    assert len(made) == 2  # no GPU version: searched on the CPU


@pytest.mark.skipif(faiss.get_num_gpus() == 0, reason="needs a faiss GPU")
def test_gpu_gallery_search_matches_cpu():
    x, xq = _data(5000, 64, 50, seed=10)
    ids = [str(i) for i in range(5000)]
    for kind in ("flat", "ivf"):
        g = build_gallery(x, ids, [""] * 5000, {}, kind, nprobe=10 ** 4)
        gpu = search_gallery(g, xq, 5)
        assert S.is_gpu_index(g.search_index()) and g.search_index() is g.search_index()
        D, I = S.search(g.index, xq, 5, nprobe=10 ** 4, use_gpu=False)
        assert np.mean([r["matches"][0]["identity"] == ids[i] for r, i in zip(gpu, I[:, 0])]) > 0.99


# ---------------------------------------------------------------- bad input on the CLI


def test_cli_build_and_add_embeddings(tmp_path):
    x = np.random.default_rng(11).standard_normal((30, 12)).astype(np.float32)
    np.save(tmp_path / "e.npy", x)
    _write_labels(tmp_path / "l.json", [f"id{i // 3}" for i in range(30)], [f"img{i}.jpg" for i in range(30)])
    res = run_cli("index", "build", "--embeddings", tmp_path / "e.npy", "--labels", tmp_path / "l.json",
                  "-o", tmp_path / "idx", "--kind", "ivfpq", "--nlist", 4, "--pq-m", 2, "--nprobe", 4, "--k-factor", 30)
    assert res.exit_code == 0, res.output
    assert "indexed 30 embeddings of 10 identities (ivfpq, dim 12)" in res.stdout
    meta = read_meta(tmp_path / "idx")
    assert meta["params"] == {"nlist": 4, "pq_m": 2, "nprobe": 4, "k_factor": 30}
    assert load_gallery(tmp_path / "idx").paths[3] == "img3.jpg"
    assert run_cli("index", "add", tmp_path / "idx", "--embeddings", tmp_path / "e.npy", "--labels",
                   tmp_path / "l.json").exit_code == 0
    assert len(load_gallery(tmp_path / "idx")) == 60
    assert_one_line_error(run_cli("search", tmp_path / "e.npy", "--index", tmp_path / "idx"),
                          "built from embeddings without a model; pass --model")


def test_cli_help_lists_every_kind():
    from facefuse.cli import _kind_names

    assert _kind_names().split(", ") == ["auto", *S.KINDS.names()]


@pytest.mark.parametrize("case,fragments", [
    ("rows", ["l.txt", "5 labels/paths for 6 embedding rows"]),
    ("nan", ["e.npy", "row 4 holds a non-finite value"]),
    ("kind", ["unknown index kind 'lsh'; valid: flat"]),
    ("param", ["index kind 'flat' takes no parameter nprobe"]),
    ("not-npy", ["e.npy", "not a readable .npy array"]),
    ("1-d", ["e.npy", "expected a non-empty 2-D float array"]),
    ("shard-dims", ["b.npy", "4-d embeddings, but a.npy holds 3-d"]),
    ("both", ["give GALLERY_DIR, or --embeddings with --labels"]),
    ("no-labels", ["give GALLERY_DIR, or --embeddings with --labels"]),
])
def test_cli_build_bad_input_writes_nothing(tmp_path, case, fragments):
    x = np.random.default_rng(12).standard_normal((6, 3)).astype(np.float32)
    emb, labels, extra = tmp_path / "e.npy", tmp_path / "l.txt", []
    np.save(emb, x)
    _write_labels(labels, list("abcdef"))
    if case == "rows":
        _write_labels(labels, list("abcde"))
    elif case == "nan":
        x[4, 1] = np.nan
        np.save(emb, x)
    elif case == "kind":
        extra = ["--kind", "lsh"]
    elif case == "param":
        extra = ["--kind", "flat", "--nprobe", 4]
    elif case == "not-npy":
        emb.write_text("not numpy")
    elif case == "1-d":
        np.save(emb, x[:, 0])
    elif case == "shard-dims":
        emb = tmp_path / "shards"
        emb.mkdir()
        np.save(emb / "a.npy", x[:3])
        np.save(emb / "b.npy", np.ones((3, 4), np.float32))
    elif case == "both":
        extra = [tmp_path]
    before = sorted(p.name for p in tmp_path.iterdir())
    args = ["--embeddings", emb] + ([] if case == "no-labels" else ["--labels", labels])
    assert_one_line_error(run_cli("index", "build", *args, "-o", tmp_path / "idx", *extra), *fragments)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize("case,fragments", [
    ("dim", ["e.npy", "5-d rows but", "holds 4-d embeddings"]),
    ("rows", ["l.txt", "2 labels/paths for 3 embedding rows"]),
    ("inf", ["e.npy", "row 1 holds a non-finite value"]),
])
def test_cli_add_bad_input_changes_nothing(tmp_path, case, fragments):
    x = S.normalize(np.random.default_rng(13).standard_normal((8, 4)))
    save_gallery(build_gallery(x, ["a"] * 8, [""] * 8, {}, "flat"), tmp_path / "idx")
    state = {p.name: p.read_bytes() for p in (tmp_path / "idx").iterdir() if p.is_file()}
    new = np.random.default_rng(14).standard_normal((3, 5 if case == "dim" else 4)).astype(np.float32)
    if case == "inf":
        new[1, 0] = np.inf
    np.save(tmp_path / "e.npy", new)
    _write_labels(tmp_path / "l.txt", ["b"] * (2 if case == "rows" else 3))
    assert_one_line_error(run_cli("index", "add", tmp_path / "idx", "--embeddings", tmp_path / "e.npy",
                                  "--labels", tmp_path / "l.txt"), *fragments)
    assert {p.name: p.read_bytes() for p in (tmp_path / "idx").iterdir() if p.is_file()} == state
