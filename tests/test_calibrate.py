"""Calibrated thresholds (`facefuse calibrate`, index.calibrate): the threshold rule against a brute
force over scores and sklearn's ROC, pair formation against brute-force enumeration, the record
stored in .pt and .onnx files, and verify deciding at it; each kind of bad input."""

import json
import shutil

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_curve

from helpers import assert_one_line_error, make_model_file, run_cli, write_identities

from facefuse.core import metrics
from facefuse.core.errors import FacefuseError
from facefuse.export.runtime import TorchEmbedder, load_embedder
from facefuse.verification import calibrate as cal


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    yield


# ---------------------------------------------------------------- the threshold rule


def _brute_threshold(impostor, far):
    """Smallest float32 candidate t (every score and the next float32 above it) with
    #(impostor >= t) <= far * n."""
    s = np.asarray(impostor, np.float32)
    cands = np.unique(np.r_[s, np.nextafter(s, np.float32(np.inf))])
    for t in cands:  # ascending
        if np.count_nonzero(s >= t) <= far * s.size * (1 + 1e-12):
            return float(t)
    raise AssertionError("no threshold")


@pytest.mark.parametrize("n_imp,n_gen,ties", [(997, 101, False), (2000, 37, True), (4099, 500, True)])
@pytest.mark.parametrize("far", [0.1, 0.0213, 0.011])
def test_threshold_at_far_is_the_brute_force_one(n_imp, n_gen, ties, far):
    rng = np.random.default_rng(n_imp)
    imp = rng.normal(0.1, 0.15, n_imp).astype(np.float32)
    gen = rng.normal(0.6, 0.15, n_gen).astype(np.float32)
    if ties:  # many impostors share scores, some exactly at the boundary region
        imp = np.round(imp, 2).astype(np.float32)
        gen = np.round(gen, 2).astype(np.float32)
    t, accepted = metrics.threshold_at_far(imp, far)
    assert t == _brute_threshold(imp, far)
    assert accepted == np.count_nonzero(imp >= np.float32(t)) <= far * n_imp
    rec = cal.thresholds_from_scores(gen, imp, [far])
    (e,) = rec["at_far"]
    assert e["threshold"] == t and e["realised_far"] == accepted / n_imp
    # sklearn: the last operating point (lowest threshold) with FPR <= far accepts the same pairs
    y = np.r_[np.ones(n_gen), np.zeros(n_imp)]
    fpr, tpr, thr = roc_curve(y, np.r_[gen, imp].astype(np.float64), drop_intermediate=False)
    ok = fpr <= far * (1 + 1e-12)
    assert e["tar"] == pytest.approx(tpr[ok][-1], abs=1e-12) and e["tar"] == pytest.approx(tpr[ok].max())
    assert e["realised_far"] == pytest.approx(fpr[ok][-1], abs=1e-12)
    best_t, best_acc = metrics.best_threshold(np.r_[gen, imp], y)
    assert rec["best_accuracy"] == {"threshold": best_t, "accuracy": best_acc}


def test_ties_at_the_boundary_are_rejected():
    imp = np.array([0.9] * 3 + [0.1] * 97, np.float32)  # 3 impostors tied at the top
    t, accepted = metrics.threshold_at_far(imp, 0.02)    # 2 accepts allowed: none of the tied 3
    assert accepted == 0 and t > 0.9 and t == np.nextafter(np.float32(0.9), np.float32(1))
    t, accepted = metrics.threshold_at_far(imp, 0.03)
    assert accepted == 3 and np.float32(0.1) < t <= np.float32(0.9)


def test_which_fars_are_kept_and_refused():
    gen, rng = np.full(5, 0.8, np.float32), np.random.default_rng(0)
    rec = cal.thresholds_from_scores(gen, rng.normal(0, 0.1, 2000), None)  # 10/2000 = 0.005
    assert [e["far"] for e in rec["at_far"]] == [1e-2]
    rec = cal.thresholds_from_scores(gen, rng.normal(0, 0.1, 10000), None)
    assert [e["far"] for e in rec["at_far"]] == [1e-2, 1e-3]
    with pytest.raises(FacefuseError, match="below what 2000 impostor pairs support"):
        cal.thresholds_from_scores(gen, rng.normal(0, 0.1, 2000), [1e-2, 1e-3])
    with pytest.raises(FacefuseError, match="support no FAR"):
        cal.thresholds_from_scores(gen, rng.normal(0, 0.1, 500), None)
    for bad in (0.0, 1.0, 1.5, -0.1, float("nan")):
        with pytest.raises(FacefuseError, match="must be in \\(0, 1\\)"):
            cal.check_fars([bad])
    with pytest.raises(FacefuseError, match="no.*genuine|genuine.*none"):
        cal.thresholds_from_scores([], [0.1] * 100, [0.1])
    with pytest.raises(FacefuseError, match="impostor.*none"):
        cal.thresholds_from_scores([0.5], [], [0.1])


# ---------------------------------------------------------------- pairs from identities


@pytest.mark.parametrize("sizes", [(1, 3, 2, 5), (4,) * 7, (1, 1, 1)])
def test_genuine_and_impostor_pairs_match_enumeration(sizes):
    ids = np.random.default_rng(len(sizes)).permutation(np.repeat(np.arange(len(sizes)), sizes))
    every = [(i, j) for i in range(ids.size) for j in range(i + 1, ids.size)]
    ga, gb = cal.genuine_pairs(ids)
    assert sorted(zip(ga.tolist(), gb.tolist())) == [(i, j) for i, j in every if ids[i] == ids[j]]
    imp = [(i, j) for i, j in every if ids[i] != ids[j]]
    a, b = cal.impostor_pairs(ids, 10 ** 6)
    assert sorted(zip(a.tolist(), b.tolist())) == imp  # fewer than asked: all of them
    for n in (1, len(imp) // 2 + 1, len(imp) - 1):
        a, b = cal.impostor_pairs(ids, n, seed=3)
        got = list(zip(a.tolist(), b.tolist()))
        assert len(got) == len(set(got)) == n and set(got) <= set(imp)
        assert got == list(zip(*map(np.ndarray.tolist, cal.impostor_pairs(ids, n, seed=3))))  # seeded


def test_sampled_impostors_are_distinct_and_cross_identity():
    ids = np.random.default_rng(1).integers(0, 60, 900)
    a, b = cal.impostor_pairs(ids, 50_000, seed=1)
    assert a.size == 50_000 and np.all(ids[a] != ids[b]) and np.all(a < b)
    assert np.unique(a * 900 + b).size == 50_000


# ---------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    root = tmp_path_factory.mktemp("cal")
    ids = write_identities(root / "ids", [f"id{k:02d}" for k in range(8)], 4, seed=2, size=64)
    return root, ids


def _embed(model, paths):
    e, _ = TorchEmbedder(model, device="cpu").embed_paths(paths, workers=0)
    return e


def _folder_scores(model, ids):
    paths = [p for n in sorted(ids) for p in ids[n]]
    lab = np.repeat(np.arange(len(ids)), [len(ids[n]) for n in sorted(ids)])
    e = _embed(model, paths).astype(np.float32)
    s = e @ e.T
    iu = np.triu_indices(len(paths), 1)
    same = lab[iu[0]] == lab[iu[1]]
    return s[iu][same], s[iu][~same], paths, e


def test_calibrate_folder_into_pt_then_verify_decides_at_it(faces, tmp_path):
    root, ids = faces
    model = make_model_file(tmp_path / "model.pt")
    res = run_cli("calibrate", root / "ids", "--model", model, "--far", 0.05, "--far", 0.1, "--json")
    assert res.exit_code == 0, res.output
    rec = json.loads(res.stdout)
    gen, imp, paths, emb = _folder_scores(model, ids)
    assert rec["provenance"]["genuine_pairs"] == gen.size == 48 and rec["provenance"]["impostor_pairs"] == imp.size
    assert rec["provenance"]["source"] == "ids" and rec["provenance"]["identities"] == 8
    assert rec["provenance"]["fingerprint"] == load_embedder(model).fingerprint
    for e in rec["at_far"]:
        assert e["threshold"] == pytest.approx(_brute_threshold(imp, e["far"]), abs=1e-6)  # matmul vs einsum ulps
        assert e["tar"] == pytest.approx(np.mean(gen >= e["threshold"]), abs=1 / gen.size + 1e-9)
    stored = load_embedder(model).meta.thresholds
    assert stored["at_far"] == rec["at_far"] and "/" not in stored["provenance"]["source"]
    # verify without labels: decides at the stored threshold nearest 1e-3 (0.05), --far picks, --threshold overrides
    pa, pb = paths[:-1], paths[1:]
    pairs = tmp_path / "p.txt"
    pairs.write_text("".join(f"{a}\t{b}\n" for a, b in zip(pa, pb)))
    s = np.sum(emb[:-1] * emb[1:], axis=1)
    for extra, t in (((), rec["at_far"][1]["threshold"]), (("--far", 0.1), rec["at_far"][0]["threshold"]),
                     (("--threshold", 0.5), 0.5)):
        v = run_cli("verify", pairs, "--model", model, "--json", *extra)
        assert v.exit_code == 0, v.output
        m = json.loads(v.stdout)
        assert m["threshold"] == t and np.sum(s >= t + 1e-6) <= m["same"] <= np.sum(s >= t - 1e-6)
    assert "calibrated at FAR 0.05 on ids" == json.loads(run_cli("verify", pairs, "--model", model,
                                                                 "--json").stdout)["threshold_source"]
    # with labels: the realised rates at the stored threshold next to the usual metrics
    y = np.array([int(a.parent == b.parent) for a, b in zip(pa, pb)])
    lab = tmp_path / "l.txt"
    lab.write_text("".join(f"{a}\t{b}\t{k}\n" for a, b, k in zip(pa, pb, y)))
    m = json.loads(run_cli("verify", lab, "--model", model, "--json").stdout)
    t = rec["at_far"][1]["threshold"]
    ls = metrics.rates_at_threshold(s, y, t)
    assert "roc_auc" in m and m["threshold"] == t
    assert m["threshold_far"] == pytest.approx(ls["far"]) and m["threshold_tar"] == pytest.approx(ls["tar"])


def test_export_carries_thresholds_and_onnx_calibrates_in_place(faces, tmp_path):
    root, ids = faces
    run_dir = tmp_path / "run"
    model = make_model_file(run_dir / "model.pt")
    assert run_cli("calibrate", root / "ids", "--model", run_dir, "--far", 0.1).exit_code == 0  # a run folder
    onnx_path = tmp_path / "m.onnx"
    res = run_cli("export", "--onnx", onnx_path, "--checkpoint", run_dir, "--exporter", "torchscript",
                  "--check-images", root / "ids")
    assert res.exit_code == 0, res.output
    assert "carried the calibrated thresholds (FAR 0.1)" in res.stdout
    assert load_embedder(onnx_path).meta.thresholds == load_embedder(model).meta.thresholds
    res = run_cli("calibrate", root / "ids", "--model", onnx_path, "--far", 0.05, "--json")
    assert res.exit_code == 0, res.output
    onnx_meta = load_embedder(onnx_path).meta
    assert [e["far"] for e in onnx_meta.thresholds["at_far"]] == [0.05]
    assert onnx_meta.fingerprint == load_embedder(model).fingerprint
    gen, imp, *_ = _folder_scores(model, ids)
    assert onnx_meta.thresholds["at_far"][0]["threshold"] == pytest.approx(_brute_threshold(imp, 0.05), abs=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "run"]  # no temp file left


def test_calibrate_from_a_labelled_pairs_file(faces, tmp_path):
    root, ids = faces
    model = make_model_file(tmp_path / "model.pt")
    gen, imp, paths, emb = _folder_scores(model, ids)
    names = sorted(ids)
    rows = [(a, b, 1) for n in names for a, b in zip(ids[n][:-1], ids[n][1:])]
    rows += [(ids[names[i]][k], ids[names[j]][k], 0) for i in range(8) for j in range(i + 1, 8) for k in range(4)]
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("".join(f"{a.relative_to(root)},{b.relative_to(root)},{y}\n" for a, b, y in rows))
    res = run_cli("calibrate", pairs, "--model", model, "--root", root, "--far", 0.1, "--json", "--dry-run")
    assert res.exit_code == 0, res.output
    rec = json.loads(res.stdout)
    s = _embed(model, [r[0] for r in rows]) * _embed(model, [r[1] for r in rows])
    s = s.sum(1)
    y = np.array([r[2] for r in rows])
    assert rec["provenance"]["genuine_pairs"] == 24 and rec["provenance"]["impostor_pairs"] == 112
    assert rec["at_far"][0]["threshold"] == pytest.approx(_brute_threshold(s[y == 0], 0.1), abs=1e-6)
    assert load_embedder(model).meta.thresholds == {}  # --dry-run wrote nothing


# ---------------------------------------------------------------- bad input


def test_bad_input_is_one_line_and_writes_nothing(faces, tmp_path):
    root, ids = faces
    model = make_model_file(tmp_path / "model.pt")
    before = model.read_bytes()
    a, b, c = ids["id00"][0], ids["id00"][1], ids["id01"][0]
    only_same = tmp_path / "same.txt"
    only_same.write_text(f"{a}\t{b}\t1\n")
    only_diff = tmp_path / "diff.txt"
    only_diff.write_text(f"{a}\t{c}\t0\n")
    unlabelled = tmp_path / "u.txt"
    unlabelled.write_text(f"{a}\t{c}\n")
    assert_one_line_error(run_cli("calibrate", only_same, "--model", model), "same.txt", "impostor")
    assert_one_line_error(run_cli("calibrate", only_diff, "--model", model), "diff.txt", "genuine")
    assert_one_line_error(run_cli("calibrate", unlabelled, "--model", model), "u.txt", "labelled")
    assert_one_line_error(run_cli("calibrate", root / "ids", "--model", model, "--far", 1.5), "--far 1.5", "(0, 1)")
    assert_one_line_error(run_cli("calibrate", root / "ids", "--model", model, "--far", 0), "--far 0")
    assert_one_line_error(run_cli("calibrate", root / "ids", "--model", model, "--far", 0.001),
                          "ids", "--far 0.001", "below what")
    assert_one_line_error(run_cli("calibrate", root / "ids", "--model", model), "support no FAR")
    assert_one_line_error(run_cli("calibrate", tmp_path / "empty", "--model", model), "empty")
    assert model.read_bytes() == before
    assert_one_line_error(run_cli("verify", unlabelled, "--model", model, "--far", 0.001),
                          "--far 0.001", "model.pt has no calibrated thresholds")
    assert_one_line_error(run_cli("verify", unlabelled, "--model", model, "--far", 0.1, "--threshold", 0.3),
                          "--threshold or --far")


def test_non_finite_embedding_is_an_error(faces, tmp_path):
    root, ids = faces
    model = make_model_file(tmp_path / "nan.pt")
    payload = torch.load(model, weights_only=True)
    key = next(k for k, v in payload["embedder"].items() if v.dtype.is_floating_point and v.ndim == 4)
    payload["embedder"][key].fill_(float("nan"))
    torch.save(payload, model)
    pairs = tmp_path / "p.txt"
    pairs.write_text(f"{ids['id00'][0]}\t{ids['id01'][0]}\t0\n")
    assert_one_line_error(run_cli("verify", pairs, "--model", model, "--out", tmp_path / "o.csv"),
                          "non-finite embedding", "p.txt:1")
    assert_one_line_error(run_cli("calibrate", root / "ids", "--model", model, "--far", 0.1), "non-finite embedding")
    assert not (tmp_path / "o.csv").exists()


def test_stale_thresholds_of_another_model_are_refused(faces, tmp_path):
    root, ids = faces
    a = make_model_file(tmp_path / "a.pt", seed=0)
    assert run_cli("calibrate", root / "ids", "--model", a, "--far", 0.1).exit_code == 0
    from facefuse.export.runtime import write_thresholds
    b = make_model_file(tmp_path / "b.pt", seed=1)
    write_thresholds(b, load_embedder(a).meta.thresholds)
    pairs = tmp_path / "p.txt"
    pairs.write_text(f"{ids['id00'][0]}\t{ids['id01'][0]}\n")
    assert_one_line_error(run_cli("verify", pairs, "--model", b), "b.pt", "calibrated for model")
    shutil.copy(a, tmp_path / "c.pt")
    assert run_cli("verify", pairs, "--model", tmp_path / "c.pt").exit_code == 0


# ---------------------------------------------------------------- benchmarks/calibration_transfer.py


def test_transfer_benchmark_logic_against_brute_force():
    """Calibrate on one half of the identities, measure on the other: every figure recomputed here
    from the full score matrix (all pairs are few enough to enumerate, so no sampling)."""
    from benchmarks.calibration_transfer import transfer

    rng = np.random.default_rng(0)
    ids = np.repeat(np.arange(12), 5)
    centres = rng.standard_normal((12, 16))
    emb = centres[ids] + 1.2 * rng.standard_normal((ids.size, 16))
    emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)
    official = (np.array([0, 5, 10, 0]), np.array([1, 6, 20, 30]), np.array([1, 1, 0, 0]))
    rows, counts = transfer(emb, ids, fars=[0.1, 0.05], seed=4, official=official)
    names = np.random.default_rng(4).permutation(np.unique(ids))
    half = {"half A": np.isin(ids, names[:6]), "half B": np.isin(ids, names[6:])}

    def scores(mask):
        idx = np.flatnonzero(mask)
        s = emb[idx] @ emb[idx].T
        a, b = np.triu_indices(idx.size, 1)
        same = ids[idx][a] == ids[idx][b]
        return s[a, b][same], s[a, b][~same]

    assert counts["half A"] == {"identities": 6, "images": 30, "genuine": 60, "impostors": 375}
    for r in rows:
        if r["measured_on"] == "official fold pairs":
            g_cal, i_cal = scores(np.ones(ids.size, bool))
            g, i = np.array([emb[0] @ emb[1], emb[5] @ emb[6]]), np.array([emb[10] @ emb[20], emb[0] @ emb[30]])
        else:
            g_cal, i_cal = scores(half[r["calibrated_on"]])
            g, i = scores(half[r["measured_on"]])
        t = _brute_threshold(i_cal, r["far"])
        assert r["threshold"] == pytest.approx(t, abs=1e-6)
        assert r["realised_far"] == pytest.approx(np.mean(i >= r["threshold"]))
        assert r["realised_tar"] == pytest.approx(np.mean(g >= r["threshold"]))
        assert r["cal_tar"] == pytest.approx(np.mean(g_cal >= r["threshold"]))
    assert {(r["calibrated_on"], r["measured_on"]) for r in rows} == {
        ("half A", "half B"), ("half B", "half A"), ("fold identities", "official fold pairs")}


def test_transfer_benchmark_reads_the_fold_identities(tmp_path):
    from benchmarks.calibration_transfer import fold_images

    lfw = tmp_path / "lfw"
    write_identities(lfw, ["Ann", "Bob", "Cid", "Dee"], 3, size=16, layout="lfw")
    (lfw / "pairs.txt").write_text("2\t1\nAnn\t1\t2\nAnn\t1\tBob\t3\nCid\t2\t3\nCid\t1\tDee\t2\n")
    paths, ids, (ia, ib, labels) = fold_images(lfw / "pairs.txt", lfw, 0)
    assert [p.name for p in paths] == [f"{n}_{k:04d}.jpg" for n in ("Ann", "Bob") for k in (1, 2, 3)]
    assert ids.tolist() == [0, 0, 0, 1, 1, 1]
    assert [(paths[a].name, paths[b].name) for a, b in zip(ia, ib)] == [
        ("Ann_0001.jpg", "Ann_0002.jpg"), ("Ann_0001.jpg", "Bob_0003.jpg")]
    assert labels.tolist() == [1, 0]
