"""index.search / index.gallery: every index kind against numpy brute force, on-disk round trips,
enrolling without a rebuild, and the refusals (model mismatch, empty gallery, broken files)."""

import json

import faiss
import numpy as np
import pytest

from facefuse.index import search as S
from facefuse.index.gallery import (build_gallery, identity_from_name, load_gallery, read_meta, save_gallery,
                                    scan_gallery, search_gallery)
from facefuse.core.errors import FacefuseError

MODEL = {"fingerprint": "abc123", "embedding_dim": 0, "backbone": "resnet18"}


def _vectors(n, d, seed, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return S.normalize(rng.normal(size=(n, d))).astype(dtype)


def _clustered(n_ids, per_id, d, seed, noise=0.3):
    """Vectors grouped around one centre per identity (like embeddings of the same face)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_ids, d))
    x = np.repeat(centres, per_id, 0) + noise * rng.normal(size=(n_ids * per_id, d))
    labels = np.repeat(np.arange(n_ids), per_id)
    return S.normalize(x), labels


def _check_knn(D, I, xb, xq, k, atol):
    Dr, Ir = S.knn_numpy(xb, xq, k)
    np.testing.assert_allclose(D, Dr, atol=atol, rtol=0)
    # ids may differ only where scores tie within float32 rounding
    sims = S.as_float32(xq).astype(np.float64) @ S.as_float32(xb).astype(np.float64).T
    np.testing.assert_allclose(np.take_along_axis(sims, I, 1), Dr, atol=atol, rtol=0)
    assert np.mean(I == Ir) > 0.99


@pytest.mark.parametrize("n,d,nq,k", [(1, 3, 2, 1), (7, 17, 5, 3), (97, 64, 11, 10), (1000, 31, 13, 7)])
@pytest.mark.parametrize("dtype,atol", [(np.float32, 1e-5), (np.float64, 1e-5)])
def test_flat_matches_brute_force(n, d, nq, k, dtype, atol):
    xb, xq = _vectors(n, d, 0, dtype), _vectors(nq, d, 1, dtype)
    index = S.build_index(xb, "flat")
    k = min(k, n)
    D, I = S.search(index, xq, k)
    assert D.dtype == np.float32 and I.dtype == np.int64 and D.shape == (nq, k)
    _check_knn(D, I, xb, xq, k, atol)


@pytest.mark.parametrize("n,d", [(97, 16), (2000, 32)])
def test_ivf_full_probe_is_exact_and_default_nlist(n, d):
    xb, xq = _vectors(n, d, 2), _vectors(17, d, 3)
    index = S.build_index(xb, "ivf")
    assert faiss.downcast_index(index).nlist == S.default_nlist(n) == round(4 * np.sqrt(n))
    D, I = S.search(index, xq, 5, nprobe=S.default_nlist(n))
    _check_knn(D, I, xb, xq, 5, 1e-5)


def test_ivf_nprobe_trades_recall():
    xb, xq = _vectors(4000, 32, 4), _vectors(200, 32, 5)
    index = S.build_index(xb, "ivf", nlist=64)
    _, Ir = S.knn_numpy(xb, xq, 1)
    r1 = np.mean(S.search(index, xq, 1, nprobe=1)[1][:, 0] == Ir[:, 0])
    r64 = np.mean(S.search(index, xq, 1, nprobe=64)[1][:, 0] == Ir[:, 0])
    assert r64 == 1.0 and r1 < r64


@pytest.mark.parametrize("n,d", [(50, 8), (3000, 48)])
def test_hnsw_recall_vs_brute_force(n, d):
    xb, xq = _vectors(n, d, 6), _vectors(100, d, 7)
    index = S.build_index(xb, "hnsw")
    D, I = S.search(index, xq, 10, ef_search=256)
    Dr, Ir = S.knn_numpy(xb, xq, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(I, Ir)])
    assert recall >= 0.99
    np.testing.assert_allclose(D[:, 0], Dr[:, 0], atol=1e-5)


def test_unknown_kind_lists_valid():
    with pytest.raises(ValueError, match="valid: flat, ivf, hnsw"):
        S.build_index(_vectors(4, 3, 0), "lsh")


@pytest.mark.parametrize("n_ids,per_id,k", [(1, 3, 1), (5, 1, 3), (23, 7, 5), (40, 13, 11)])
def test_search_identities_is_top_k_of_per_identity_max(n_ids, per_id, k):
    xb, labels = _clustered(n_ids, per_id, 24, 8)
    xq = _vectors(9, 24, 9)
    k = min(k, n_ids)
    Sc, L, R = S.search_identities(S.build_index(xb), xq, labels, k)
    sims = xq.astype(np.float64) @ xb.astype(np.float64).T
    per_id_max = np.stack([sims[:, labels == c].max(1) for c in range(n_ids)], 1)
    ref = np.argsort(-per_id_max, 1, kind="stable")[:, :k]
    np.testing.assert_array_equal(L, ref)
    np.testing.assert_allclose(Sc, np.take_along_axis(per_id_max, ref, 1), atol=1e-5)
    assert np.all(labels[R] == L)
    for row in L:
        assert len(set(row.tolist())) == k


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_gallery_round_trip_and_add(tmp_path, kind):
    x, labels = _clustered(30, 5, 16, 10)
    ids = [f"id{i}" for i in labels]
    paths = [f"/g/id{i}/{j}.jpg" for j, i in enumerate(labels)]
    first = 100
    g = build_gallery(x[:first], ids[:first], paths[:first], {**MODEL, "embedding_dim": 16}, kind)
    save_gallery(g, tmp_path / "idx")
    assert sorted(p.name for p in (tmp_path / "idx").iterdir()) == [".lock", "gallery.db", "index-000001.faiss",
                                                                     "index.faiss"]
    meta = read_meta(tmp_path / "idx")
    assert meta["count"] == first and meta["kind"] == kind and meta["dim"] == 16
    assert meta["index_file"] == "index-000001.faiss" == (tmp_path / "idx" / "index.faiss").readlink().name
    loaded = load_gallery(tmp_path / "idx", fingerprint="abc123", dim=16)
    before = None
    if kind == "ivf":  # the trained quantizer is kept: add does not retrain
        before = faiss.vector_to_array(faiss.downcast_index(faiss.downcast_index(loaded.index).quantizer).codes)
    loaded.add(x[first:], ids[first:], paths[first:])
    save_gallery(loaded, tmp_path / "idx")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left
    again = load_gallery(tmp_path / "idx")
    assert len(again) == len(x) and again.identities == ids and again.paths == paths
    if before is not None:
        after = faiss.vector_to_array(faiss.downcast_index(faiss.downcast_index(again.index).quantizer).codes)
        np.testing.assert_array_equal(before, after)
    q = x[::7] + 0.05 * _vectors(len(x[::7]), 16, 11)
    res = search_gallery(again, q, k=3, nprobe=1000, ef_search=256)
    sims = S.normalize(q).astype(np.float64) @ x.astype(np.float64).T
    for r, s in zip(res, sims):
        best = int(np.argmax(s))
        assert r["identity"] == ids[best] and r["matches"][0]["path"] == paths[best]
        assert r["score"] == pytest.approx(s[best], abs=1e-5)
        assert len({m["identity"] for m in r["matches"]}) == 3


def test_threshold_gives_unknown():
    x, labels = _clustered(4, 3, 8, 12)
    g = build_gallery(x, [str(i) for i in labels], ["p"] * 12, MODEL)
    far = -x[:1]  # the opposite direction: cosine -1 with its own identity
    hi, lo = search_gallery(g, np.r_[x[:1], far], k=2, threshold=0.5)
    assert hi["identity"] == "0" and hi["score"] == pytest.approx(1.0, abs=1e-5)
    assert lo["identity"] == "unknown" and lo["score"] < 0.5 and len(lo["matches"]) == 2


def test_refusals(tmp_path):
    x, labels = _clustered(3, 2, 8, 13)
    g = build_gallery(x, [str(i) for i in labels], ["p"] * 6, MODEL)
    save_gallery(g, tmp_path / "idx")
    with pytest.raises(FacefuseError, match="built with model abc123 but this model is zzz"):
        load_gallery(tmp_path / "idx", fingerprint="zzz", dim=8)
    with pytest.raises(FacefuseError, match="8-d embeddings but the model makes 32-d"):
        load_gallery(tmp_path / "idx", fingerprint="abc123", dim=32)
    with pytest.raises(FacefuseError, match="empty"):
        build_gallery(np.zeros((0, 8), np.float32), [], [], MODEL)
    with pytest.raises(FacefuseError, match="no such gallery index"):
        load_gallery(tmp_path / "nope")
    with pytest.raises(FacefuseError, match="not a gallery index"):
        load_gallery(tmp_path)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "precious.txt").write_text("keep me")
    with pytest.raises(FacefuseError, match="not a gallery index folder"):
        save_gallery(g, tmp_path / "other")
    assert (tmp_path / "other" / "precious.txt").read_text() == "keep me"
    import sqlite3
    with sqlite3.connect(tmp_path / "idx" / "gallery.db") as con:
        con.execute("DELETE FROM rows WHERE id = 5")
    with pytest.raises(FacefuseError, match="holds 6 8-d vectors but gallery.db lists 5 8-d ones; rebuild the index"):
        load_gallery(tmp_path / "idx")
    (tmp_path / "idx" / "gallery.db").write_bytes(b"not a database" * 100)
    with pytest.raises(FacefuseError, match="gallery.db: not a readable gallery database.*rebuild the index"):
        load_gallery(tmp_path / "idx")
    for p in (tmp_path / "idx").iterdir():
        p.unlink()
    save_gallery(g, tmp_path / "idx")
    (tmp_path / "idx" / "index.faiss").write_bytes(b"garbage" * 10)
    with pytest.raises(FacefuseError, match="not a faiss index"):
        load_gallery(tmp_path / "idx")


def test_scan_gallery_layouts(tmp_path):
    for rel in ["alice/1.jpg", "alice/deep/2.png", "bob/x.jpeg", "Carl_Jones_0001.jpg", "dave.jpg",
                "notes.txt", ".hidden/5.jpg", "bob/.DS_Store"]:
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    paths, ids = scan_gallery(tmp_path)
    got = sorted((p.relative_to(tmp_path).as_posix(), i) for p, i in zip(paths, ids))
    assert got == [("Carl_Jones_0001.jpg", "Carl_Jones"), ("alice/1.jpg", "alice"), ("alice/deep/2.png", "alice"),
                   ("bob/x.jpeg", "bob"), ("dave.jpg", "dave")]
    from pathlib import Path
    assert identity_from_name(Path("George_W_Bush_0001.jpg")) == "George_W_Bush"
    (tmp_path / "empty").mkdir()
    with pytest.raises(FacefuseError, match="empty"):
        scan_gallery(tmp_path / "empty")


@pytest.mark.skipif(faiss.get_num_gpus() == 0, reason="needs a faiss GPU")
@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_gpu_search_matches_cpu(kind):
    xb, xq = _vectors(3000, 64, 14), _vectors(50, 64, 15)
    index = S.build_index(xb, kind)
    Dc, Ic = S.search(index, xq, 5, nprobe=64, use_gpu=False)
    Dg, Ig = S.search(index, xq, 5, nprobe=64, use_gpu=True)
    np.testing.assert_allclose(Dg, Dc, atol=1e-4)
    assert np.mean(Ig == Ic) > 0.99
