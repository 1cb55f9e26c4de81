"""`facefuse index build|add` and `facefuse search` end to end, checked against numpy brute force on
the same embeddings, and each kind of bad input: exit code 2 and one `error: ...` line."""

import json
from pathlib import Path

import numpy as np
import pytest

from helpers import assert_one_line_error, make_model_file, run_cli, write_identities
from PIL import Image

from facefuse.export.runtime import TorchEmbedder
from facefuse.index.gallery import load_gallery, read_meta


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    yield




def make_faces(root, names, per_id, seed=0, flat=False):
    return write_identities(root, names, per_id, seed=seed, size=70, layout="flat" if flat else "folders")



run = run_cli



@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    model = make_model_file(root / "model.pt")
    faces = make_faces(root / "gallery", ["ann", "bob", "cid", "dee", "eve"], 3)
    return root, model, faces


def _brute(model, gallery_paths, gallery_ids, queries, k):
    """Top-k distinct identities by max cosine, in numpy float64."""
    emb = TorchEmbedder(model, device="cpu")
    g, _ = emb.embed_paths(gallery_paths, workers=0)
    q, _ = emb.embed_paths(queries, workers=0)
    sims = q.astype(np.float64) @ g.astype(np.float64).T
    names = sorted(set(gallery_ids))
    ids = np.array(gallery_ids)
    per = np.stack([sims[:, ids == n].max(1) for n in names], 1)
    order = np.argsort(-per, 1, kind="stable")[:, :k]
    return [[(names[j], per[i, j]) for j in row] for i, row in enumerate(order)]


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_build_search_add(setup, tmp_path, kind):
    root, model, faces = setup
    idx = tmp_path / "idx"
    res = run("index", "build", root / "gallery", "--model", model, "-o", idx, "--kind", kind)
    assert res.exit_code == 0, res.output
    assert "indexed 15 images of 5 identities" in res.stdout
    queries = [faces["bob"][1], faces["eve"][0], faces["ann"][2]]
    out = run("search", *queries, "--index", idx, "--model", model, "--top-k", 3, "--json", "--nprobe", 64)
    assert out.exit_code == 0, out.output
    got = json.loads(out.stdout)
    paths = [p for n in faces for p in faces[n]]
    ids = [n for n in faces for _ in faces[n]]
    ref = _brute(model, paths, ids, queries, 3)
    for r, want, q in zip(got, ref, queries):
        assert r["path"] == str(q)
        assert [m["identity"] for m in r["matches"]] == [n for n, _ in want]
        np.testing.assert_allclose([m["score"] for m in r["matches"]], [s for _, s in want], atol=1e-5)
        assert r["identity"] == want[0][0] and r["score"] == pytest.approx(1.0, abs=1e-5)  # itself
    # enroll a new identity (a folder) and one file with an explicit identity, without a rebuild
    new = make_faces(tmp_path / "new", ["fay"], 2, seed=5)
    extra = make_faces(tmp_path / "extra", ["gus"], 1, seed=6, flat=True)["gus"][0]
    add = run("index", "add", idx, tmp_path / "new", extra, "--identity", "gus")
    assert add.exit_code == 0, add.output
    assert "added 3 images" in add.stdout and "18 images of 6 identities" in add.stdout
    g = load_gallery(idx)
    assert len(g) == 18 and g.identities[-3:] == ["gus", "gus", "gus"]
    add2 = run("index", "add", idx, tmp_path / "new")  # folder layout: identity from the sub-folder
    assert add2.exit_code == 0 and load_gallery(idx).identities[-2:] == ["fay"] * 2
    # search without --model: the index remembers its model
    found = run("search", new["fay"][0], extra, "--index", idx, "--json", "--ef-search", 128, "--nprobe", 64)
    assert found.exit_code == 0, found.output
    r = json.loads(found.stdout)
    assert r[0]["score"] == pytest.approx(1.0, abs=1e-5) and r[1]["identity"] == "gus"


def test_flat_named_gallery_folder_query_and_threshold(setup, tmp_path):
    root, model, _ = setup
    faces = make_faces(tmp_path / "flat", ["Jo_Ann", "Max"], 2, seed=3, flat=True)
    idx = tmp_path / "idx"
    assert run("index", "build", tmp_path / "flat", "--model", model, "-o", idx).exit_code == 0
    res = run("search", tmp_path / "flat", "--index", idx, "--json", "--threshold", 0.999)
    got = json.loads(res.stdout)
    assert len(got) == 4 and {r["identity"] for r in got} == {"Jo_Ann", "Max"}
    noise = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(9).integers(0, 255, (70, 70, 3), dtype=np.uint8)).save(noise)
    unk = json.loads(run("search", noise, "--index", idx, "--json", "--threshold", 0.999).stdout)
    assert unk[0]["identity"] == "unknown" and unk[0]["score"] < 0.999
    text = run("search", faces["Max"][0], "--index", idx, "--top-k", 2)
    assert text.exit_code == 0 and text.stdout.split("\t")[1] == "Max"


def test_onnx_model_searches_a_checkpoint_built_index(setup, tmp_path):
    root, model, faces = setup
    idx = tmp_path / "idx"
    assert run("index", "build", root / "gallery", "--model", model, "-o", idx).exit_code == 0
    onnx_path = tmp_path / "m.onnx"
    exp = run("export", "--onnx", onnx_path, "--checkpoint", model, "--exporter", "torchscript")
    assert exp.exit_code == 0, exp.output
    a = json.loads(run("search", root / "gallery", "--index", idx, "--json").stdout)
    b = json.loads(run("search", root / "gallery", "--index", idx, "--model", onnx_path, "--json").stdout)
    assert [r["identity"] for r in a] == [r["identity"] for r in b]
    np.testing.assert_allclose([r["score"] for r in a], [r["score"] for r in b], atol=1e-5)


# ---------------------------------------------------------------- bad input


def test_build_errors_leave_nothing_behind(setup, tmp_path):
    root, model, faces = setup
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run("index", "build", tmp_path / "empty", "--model", model, "-o", tmp_path / "i"),
                          "the gallery is empty")
    g = tmp_path / "g"
    make_faces(g, ["ann", "bob"], 2)
    (g / "bob" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    assert_one_line_error(run("index", "build", g, "--model", model, "-o", tmp_path / "i"),
                          "1 unreadable image(s)", "broken.jpg")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "g"]  # no index, no temp folder
    ok = run("index", "build", g, "--model", model, "-o", tmp_path / "i", "--skip-missing")
    assert ok.exit_code == 0 and "indexed 4 images" in ok.stdout and "skipped 1" in ok.stdout
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "mine.txt").write_text("x")
    assert_one_line_error(run("index", "build", g, "--model", model, "-o", tmp_path / "keep", "--skip-missing"),
                          "not a gallery index folder")
    assert (tmp_path / "keep" / "mine.txt").exists()


def test_search_errors(setup, tmp_path):
    root, model, faces = setup
    idx = tmp_path / "idx"
    assert run("index", "build", root / "gallery", "--model", model, "-o", idx).exit_code == 0
    other = make_model_file(tmp_path / "other.pt", seed=1)
    assert_one_line_error(run("search", faces["ann"][0], "--index", idx, "--model", other),
                          "index was built with model", "search with the model the index was built with")
    wide = make_model_file(tmp_path / "wide.pt", seed=1, dim=48)
    assert_one_line_error(run("search", faces["ann"][0], "--index", idx, "--model", wide), "48-d")
    assert_one_line_error(run("index", "add", idx, faces["ann"][0], "--model", other), "index was built with model")
    text = tmp_path / "query.jpg"
    text.write_text("I am not an image")
    assert_one_line_error(run("search", text, "--index", idx), "1 unreadable image(s)", "query.jpg")
    assert_one_line_error(run("search", tmp_path / "gone.jpg", "--index", idx), "gone.jpg: no such file")
    assert_one_line_error(run("search", faces["ann"][0], "--index", root / "gallery", "--model", model),
                          "not a gallery index")
    junk = tmp_path / "junk.onnx"
    junk.write_text("nope")
    assert_one_line_error(run("search", faces["ann"][0], "--index", idx, "--model", junk), "not a valid ONNX model")
    (idx / "index.faiss").write_bytes(b"corrupt")
    assert_one_line_error(run("search", faces["ann"][0], "--index", idx, "--model", model), "not a faiss index")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run("search", tmp_path / "empty", "--index", idx, "--model", model), "holds no images")


def test_search_answers_unknown_below_the_calibrated_threshold(setup, tmp_path):
    """With thresholds stored in the model, `unknown` is the default below the one nearest FAR 1e-3;
    --far picks another stored one, --threshold overrides, --far on an uncalibrated model is an error."""
    import shutil

    from facefuse.export.runtime import load_embedder, write_thresholds

    root, model, faces = setup
    calibrated = tmp_path / "calibrated.pt"
    shutil.copy(model, calibrated)
    fp = load_embedder(calibrated).fingerprint
    entry = lambda far, t: {"far": far, "threshold": t, "tar": 1.0, "realised_far": far,  # noqa: E731
                            "accepted_impostors": 10}
    write_thresholds(calibrated, {"version": 1, "at_far": [entry(1e-2, -1.0), entry(1e-3, 0.999)],
                                  "best_accuracy": {"threshold": 0.5, "accuracy": 1.0},
                                  "provenance": {"source": "hand-made", "fingerprint": fp}})
    idx = tmp_path / "idx"
    assert run("index", "build", root / "gallery", "--model", calibrated, "-o", idx).exit_code == 0
    noise = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(9).integers(0, 255, (70, 70, 3), dtype=np.uint8)).save(noise)
    found = json.loads(run("search", faces["bob"][0], noise, "--index", idx, "--json").stdout)
    assert found[0]["identity"] == "bob" and found[0]["threshold"] == 0.999
    assert found[1]["identity"] == "unknown" and found[1]["score"] < 0.999
    loose = json.loads(run("search", noise, "--index", idx, "--json", "--far", 0.01).stdout)
    assert loose[0]["identity"] != "unknown" and loose[0]["threshold"] == -1.0
    given = json.loads(run("search", noise, "--index", idx, "--json", "--threshold", -1).stdout)
    assert given[0]["identity"] != "unknown"
    assert_one_line_error(run("search", noise, "--index", idx, "--far", 1e-4), "--far 0.0001", "0.01, 0.001 only")
    plain = tmp_path / "plain"
    assert run("index", "build", root / "gallery", "--model", model, "-o", plain).exit_code == 0
    assert json.loads(run("search", noise, "--index", plain, "--json").stdout)[0]["identity"] != "unknown"
    assert_one_line_error(run("search", noise, "--index", plain, "--far", 1e-3), "no calibrated thresholds")


def _pasted_scenes(tmp_path, lfw):
    """Two aligned LFW faces each of three people pasted into larger grey scenes (not aligned):
    ``(gallery folder of the first shots, the second shots, {scene: its hand-made Haar crop})``."""
    pytest.importorskip("cv2")
    from facefuse.core.facecrop import HaarFaceCrop

    crop, gallery, queries, hand = HaarFaceCrop(), tmp_path / "gallery", [], {}
    for k, name in enumerate(["Aaron_Peirsol", "Abdullah_Gul", "Adrien_Brody"]):
        shots = sorted((lfw / "lfw-112" / name).glob("*.jpg"))[:2]
        for j, shot in enumerate(shots):
            scene = Image.new("RGB", (300, 240), (100, 100, 100))
            scene.paste(Image.open(shot).convert("RGB").resize((160, 160)), (50 + 20 * j, 30 + 10 * k))
            path = (gallery / name if j == 0 else tmp_path) / f"{name}_{j}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            scene.save(path)
            assert crop.box(scene) is not None
            hand[path] = crop(scene)
            (queries if j == 1 else []).append(path)
    return gallery, queries, hand


def _hand_embed(model, hand, paths):
    import torch

    emb = TorchEmbedder(model, device="cpu")
    tf = emb.transform()
    return emb.embed_tensor(torch.stack([tf(hand[p]) for p in paths])).astype(np.float64)


def _assert_brute_force(out, model, hand, gallery, queries):
    g_paths = sorted(p for p in hand if p.parent.parent == gallery)
    sims = _hand_embed(model, hand, queries) @ _hand_embed(model, hand, g_paths).T
    results = json.loads(out.stdout)
    assert len(results) == len(queries)
    for r, row in zip(results, sims):
        best = {p.parent.name: s for p, s in zip(g_paths, row)}
        for m in r["matches"]:
            assert m["score"] == pytest.approx(best[m["identity"]], abs=1e-5)


def test_detect_is_stored_in_the_index_and_used_by_search(setup, tmp_path, lfw):
    """`index build --detect haar` crops every gallery face; `search` then crops its queries alike:
    its scores equal brute force on images cropped by hand."""
    root, model, _ = setup
    gallery, queries, hand = _pasted_scenes(tmp_path, lfw)
    idx = tmp_path / "idx"
    res = run("index", "build", gallery, "--model", model, "-o", idx, "--kind", "flat", "--align", "haar")
    assert res.exit_code == 0, res.output
    assert load_gallery(idx).settings["align"] == "haar"
    out = run("search", *queries, "--index", idx, "--top-k", 3, "--json")
    assert out.exit_code == 0, out.output
    _assert_brute_force(out, model, hand, gallery, queries)


def test_detect_reaches_embed_the_embeddings_index_calibrate_and_verify(setup, tmp_path, lfw):
    """`embed --detect haar` rows equal the hand-cropped embeddings; an index built from that folder
    keeps the crop for its searches; `calibrate --detect haar` thresholds the hand-cropped scores
    and records the crop, and `verify` without it is told the threshold may not hold."""
    import shutil

    from facefuse.export.extract import read_embed_folder

    root, model, _ = setup
    gallery, queries, hand = _pasted_scenes(tmp_path, lfw)
    emb_dir = tmp_path / "emb"
    r = run("embed", gallery, "--model", model, "--out", emb_dir, "--workers", 0, "--detect", "haar")
    assert r.exit_code == 0, r.output
    assert json.loads((emb_dir / "manifest.json").read_text())["settings"]["align"] == "haar"
    rows, _, paths = read_embed_folder(emb_dir)
    np.testing.assert_allclose(rows, _hand_embed(model, hand, [Path(p) for p in paths]), atol=1e-5)

    idx = tmp_path / "idx"
    r = run("index", "build", "--embeddings", emb_dir, "--model", model, "-o", idx, "--kind", "flat")
    assert r.exit_code == 0, r.output
    stored = load_gallery(idx).settings
    assert stored["align"] == "haar" and stored["flip"] is False
    out = run("search", *queries, "--index", idx, "--top-k", 3, "--json")
    assert out.exit_code == 0, out.output
    _assert_brute_force(out, model, hand, gallery, queries)
    # --detect beside made embeddings is refused; rows made without the crop cannot join this index
    assert_one_line_error(run("index", "build", "--embeddings", emb_dir, "--model", model, "-o", tmp_path / "x",
                              "--align", "haar"), "--align: --embeddings are already made")
    assert run("embed", gallery, "--model", model, "--out", tmp_path / "plain", "--workers", 0).exit_code == 0
    assert_one_line_error(run("index", "add", idx, "--embeddings", tmp_path / "plain"),
                          "made with flip off, align none; " f"{idx} embeds with flip off, align haar")

    # calibrate on every pair of the six scenes: 3 genuine, 12 impostor
    scenes = sorted(hand)
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("".join(f"{a} {b} {int(a.stem[:-2] == b.stem[:-2])}\n"
                             for i, a in enumerate(scenes) for b in scenes[i + 1:]))
    own = tmp_path / "own.pt"
    shutil.copy(model, own)
    r = run("calibrate", pairs, "--model", own, "--far", 0.9, "--detect", "haar", "--json", "--workers", 0)
    assert r.exit_code == 0, r.output
    rec = json.loads(r.stdout)
    assert rec["provenance"]["settings"]["align"] == "haar" and rec["provenance"]["settings"]["flip"] is False
    e = _hand_embed(model, hand, scenes)
    sims = e @ e.T
    same = np.array([[a.stem[:-2] == b.stem[:-2] for b in scenes] for a in scenes])
    upper = np.triu(np.ones_like(same), 1)
    genuine, impostor = sims[same & upper], np.sort(sims[~same & upper])
    assert genuine.size == 3 and impostor.size == 12
    (entry,) = rec["at_far"]  # at most 0.9 * 12 impostors accepted: the threshold passes the 2nd lowest
    assert impostor[1] - 1e-5 < entry["threshold"] <= impostor[2] + 1e-5
    assert entry["tar"] == pytest.approx(np.mean(genuine >= entry["threshold"]))
    plain = json.loads(run("verify", pairs, "--model", own, "--json", "--workers", 0).stdout)
    assert "calibrated with flip off, align haar; this run uses flip off, align none" in plain["note"]
    cropped = json.loads(run("verify", pairs, "--model", own, "--json", "--workers", 0, "--detect", "haar").stdout)
    assert "note" not in cropped and cropped["threshold"] == pytest.approx(entry["threshold"])
    # search decides at that threshold too: an index without the crop is told, the cropping one is not
    hits = json.loads(run("search", *queries, "--index", idx, "--model", own, "--json").stdout)
    assert all("note" not in h and h["threshold"] == pytest.approx(entry["threshold"]) for h in hits)
    assert run("index", "build", gallery, "--model", own, "-o", tmp_path / "uncropped", "--kind", "flat").exit_code == 0
    warned = run("search", *queries, "--index", tmp_path / "uncropped", "--json")
    assert "warning: the stored threshold was calibrated with flip off, align haar" in warned.stderr
    assert all("align none" in h["note"] for h in json.loads(warned.stdout))
