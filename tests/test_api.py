"""The Python API (facefuse.api, re-exported from the package): the README's example runs as
written, and each call agrees with an independent computation (numpy dot products, brute-force
nearest identities) and speaks in Python arguments."""

import contextlib
import io
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from helpers import make_model_file, write_identities
from PIL import Image

import facefuse
from facefuse.core.errors import FacefuseError, ParameterError

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_python() -> str:
    """The code block of the README's "Python API" section."""
    text = README.read_text()
    section = text[text.index("## Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A model file and face-like identities: 6 people x 4 images, plus a pairs file."""
    root = tmp_path_factory.mktemp("api")
    model = make_model_file(root / "model.pt", size=48, dim=16, random_bn=True)
    faces = write_identities(root / "gallery", [f"p{i}" for i in range(6)], 4, size=56)
    return root, model, faces


def test_readme_example_runs_as_written(world, tmp_path):
    root, model, faces = world
    (tmp_path / "runs" / "lfw").mkdir(parents=True)
    (tmp_path / "runs" / "lfw" / "model.pt").write_bytes(model.read_bytes())
    made = write_identities(tmp_path / "gallery", [f"Person_{i}" for i in range(5)], 3, size=56, seed=3)
    write_identities(tmp_path / "calibration", [f"c{i}" for i in range(6)], 3, size=56, seed=4)  # 135 impostors
    write_identities(tmp_path / "new", ["Jane_Doe"], 1, size=56, seed=5, layout="flat")
    (tmp_path / "new" / "Jane_Doe_0.jpg").rename(tmp_path / "new" / "Jane_Doe_0001.jpg")
    a, b = made["Person_0"][:2]
    for name, src in (("a.jpg", a), ("b.jpg", b), ("query.jpg", made["Person_1"][2])):
        (tmp_path / name).write_bytes(src.read_bytes())
    (tmp_path / "pairs.txt").write_text(f"{a} {b} 1\n{a} {made['Person_2'][0]} 0\n"
                                        f"{made['Person_3'][0]} {made['Person_3'][1]} 1\n"
                                        f"{made['Person_3'][0]} {made['Person_4'][1]} 0\n")
    out = io.StringIO()
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        with contextlib.redirect_stdout(out):
            exec(compile(readme_python(), "README.md", "exec"), {})
    finally:
        os.chdir(cwd)
    printed = out.getvalue().splitlines()
    assert printed[0].startswith("Verification(score=") and len(printed) == 3  # verify, AUC, one query
    assert 0.0 <= float(printed[1]) <= 1.0  # the AUC
    assert facefuse.open_gallery(tmp_path / "gallery-index").info().size == 5 * 3 + 1
    assert "Jane_Doe" in facefuse.open_gallery(tmp_path / "gallery-index").identities()


def test_embed_paths_pil_and_arrays_agree(world):
    root, model, faces = world
    m = facefuse.load_model(model, workers=0)
    paths = faces["p0"] + faces["p1"]
    from_files = m.embed(paths)
    pil = [Image.open(p).convert("RGB") for p in paths]
    np.testing.assert_allclose(m.embed(pil), from_files, atol=1e-5)
    np.testing.assert_allclose(m.embed([np.asarray(im) for im in pil]), from_files, atol=1e-5)
    assert from_files.shape == (8, 16) and np.allclose(np.linalg.norm(from_files, axis=1), 1, atol=1e-5)
    flipped = m.with_settings(flip=True).embed(pil[:1])
    x = m.embedder.transform(m.settings)(pil[0])[None]
    both = m.embedder.embed_tensor(x, normalize=False) + m.embedder.embed_tensor(x.flip(-1), normalize=False)
    np.testing.assert_allclose(flipped, both / np.linalg.norm(both), atol=1e-5)  # e(x) + e(mirror x), unit


def test_verify_is_the_cosine_decided_at_the_threshold(world):
    root, model, faces = world
    m = facefuse.load_model(model, workers=0)
    a, b = faces["p2"][0], faces["p3"][1]
    e = m.embed([a, b])
    v = m.verify(a, b)
    assert v.score == pytest.approx(float(e[0] @ e[1]), abs=1e-6) and v.same is None and v.threshold is None
    for t in (v.score - 1e-3, v.score + 1e-3):
        got = m.verify(a, b, threshold=t)
        assert got.same is (v.score >= t) and got.threshold_source == "threshold given"
    assert json.loads(json.dumps(got.to_dict()))["score"] == pytest.approx(v.score)


def test_gallery_search_equals_brute_force(world, tmp_path):
    root, model, faces = world
    m = facefuse.load_model(model, workers=0)
    gallery, built = facefuse.build_gallery(root / "gallery", tmp_path / "idx", m, kind="flat")
    assert (built.added, built.size, built.identities, built.kind, built.dim) == (24, 24, 6, "flat", 16)
    queries = [faces["p4"][0], faces["p5"][3]]
    hits = gallery.search(queries, top_k=3)
    paths = [p for name in sorted(faces) for p in faces[name]]
    e, q = m.embed(paths), m.embed(queries)
    for hit, row in zip(hits, q):
        best = {}
        for p, s in zip(paths, e @ row):
            best[p.parent.name] = max(best.get(p.parent.name, -2.0), float(s))
        top = sorted(best.items(), key=lambda kv: -kv[1])[:3]
        assert [mm.identity for mm in hit.matches] == [name for name, _ in top]
        assert [mm.score for mm in hit.matches] == pytest.approx([s for _, s in top], abs=1e-5)
        assert hit.identity == top[0][0] and hit.threshold is None
    assert gallery.search(queries[:1], threshold=1.01)[0].identity == "unknown"
    reopened = facefuse.open_gallery(tmp_path / "idx")  # the model it was built with, by default
    assert reopened.model.fingerprint == m.fingerprint and len(reopened) == 24


def test_api_errors_name_python_arguments(world, tmp_path):
    root, model, faces = world
    m = facefuse.load_model(model, workers=0)
    with pytest.raises(ParameterError, match=r"^far=0.5: model.pt has no calibrated thresholds"):
        m.verify(faces["p0"][0], faces["p0"][1], far=0.5)
    with pytest.raises(ParameterError, match=r"^fars=2: a false accept rate must be in \(0, 1\)$"):
        m.calibrate(root / "gallery", fars=[2], write=False)
    with pytest.raises(ParameterError, match=r"^center=True: centring needs a set"):
        m.with_settings(center=True).verify(faces["p0"][0], faces["p0"][1])
    with pytest.raises(ParameterError, match=r"^images=int: expected file paths, PIL images or uint8"):
        m.embed([Image.new("RGB", (8, 8)), 3])
    with pytest.raises(FacefuseError, match="no such gallery index folder"):
        facefuse.open_gallery(tmp_path / "nothing")
    with pytest.raises(ParameterError, match=r"^model=None: a model is needed"):
        facefuse.build_gallery(root / "gallery", tmp_path / "idx")


def test_calibrate_stores_the_settings_whole_and_verify_notes_a_mismatch(world, tmp_path):
    root, model, faces = world
    own = tmp_path / "own.pt"
    own.write_bytes(model.read_bytes())
    m = facefuse.load_model(own, workers=0, flip=True)
    c = m.calibrate(root / "gallery", fars=[0.1])
    assert c.provenance["settings"] == facefuse.EmbedSettings(flip=True, workers=0).to_dict()
    again = facefuse.load_model(own, workers=0, flip=True)
    assert again.verify(faces["p0"][0], faces["p0"][1]).note is None
    plain = facefuse.load_model(own, workers=0).verify(faces["p0"][0], faces["p0"][1])
    assert plain.threshold == pytest.approx(c.at_far[0]["threshold"])
    assert "calibrated with flip on, align none; this run uses flip off, align none" in plain.note
