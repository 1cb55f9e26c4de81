"""Forgetting people: `facefuse index remove` / `index compact` and Gallery.remove / compact in the
API. A removed person is absent from every later search at once (checked against brute force over
the people left) and leaves the files at compaction; bad requests are one-line errors."""

import json

import numpy as np
import pytest
from helpers import assert_one_line_error, make_model_file, run_cli, write_identities

import facefuse
from facefuse.core.errors import ParameterError


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("remove")
    model = make_model_file(root / "model.pt", size=48, dim=16, random_bn=True)
    faces = write_identities(root / "gallery", [f"p{i}" for i in range(5)], 3, size=56)
    return root, model, faces


def _brute_force_best(model, faces, keep, query, drop=()):
    m = facefuse.load_model(model, workers=0)
    paths = [p for name in keep for p in faces[name] if p not in drop]
    e, q = m.embed(paths), m.embed([query])[0]
    scores = e @ q
    return paths[int(np.argmax(scores))].parent.name, float(scores.max())


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_removed_identity_leaves_searches_at_once_and_the_files_at_compaction(built, tmp_path, kind):
    root, model, faces = built
    idx = tmp_path / "idx"
    assert run_cli("index", "build", root / "gallery", "--model", model, "-o", idx, "--kind", kind,
                   "--workers", 0).exit_code == 0
    query = faces["p2"][0]
    first = json.loads(run_cli("search", query, "--index", idx, "--json", "--top-k", 5).stdout)[0]
    assert first["identity"] == "p2"
    r = run_cli("index", "remove", idx, "--identity", "p2")
    assert r.exit_code == 0 and r.stdout.startswith("removed 3 image(s) of p2"), r.output
    hits = json.loads(run_cli("search", query, "--index", idx, "--json", "--top-k", 5).stdout)[0]
    assert "p2" not in [m["identity"] for m in hits["matches"]] and len(hits["matches"]) == 4
    best, score = _brute_force_best(model, faces, ["p0", "p1", "p3", "p4"], query)
    assert hits["identity"] == best and hits["score"] == pytest.approx(score, abs=1e-5)
    # one image of another person, by path
    r = run_cli("index", "remove", idx, "--image", faces["p4"][1])
    assert r.exit_code == 0, r.output
    g = facefuse.open_gallery(idx)
    assert len(g) == 15 - 4 and "p2" not in g.identities()
    c = run_cli("index", "compact", idx)
    assert c.exit_code == 0 and "dropped 4 removed" in c.stdout, c.output
    after = json.loads(run_cli("search", query, "--index", idx, "--json", "--top-k", 5).stdout)[0]
    best, score = _brute_force_best(model, faces, ["p0", "p1", "p3", "p4"], query, drop=[faces["p4"][1]])
    assert after["identity"] == best and after["score"] == pytest.approx(score, abs=1e-5)
    assert len(after["matches"]) == 4 and "p2" not in [m["identity"] for m in after["matches"]]
    on_disk = b"".join(p.read_bytes() for p in idx.rglob("*") if p.is_file())
    assert str(faces["p2"][0]).encode() not in on_disk and str(faces["p4"][1]).encode() not in on_disk


def test_remove_errors_name_the_option_or_the_argument(built, tmp_path):
    root, model, faces = built
    idx = tmp_path / "idx"
    gallery, _ = facefuse.build_gallery(root / "gallery", idx, facefuse.load_model(model, workers=0))
    assert_one_line_error(run_cli("index", "remove", idx, "--identity", "nobody"),
                          "--identity nobody: no such identity enrolled in")
    assert_one_line_error(run_cli("index", "remove", tmp_path / "none", "--identity", "p0"),
                          "no such gallery index folder")
    assert run_cli("index", "remove", idx).exit_code == 2  # nothing named: usage error
    with pytest.raises(ParameterError, match="^identity=nobody: no such identity enrolled in"):
        gallery.remove(identity="nobody")
    assert gallery.remove(identity="p1") == 3 and gallery.compact()["dropped"] == 3
    assert gallery.compact()["dropped"] == 0  # nothing pending: nothing rewritten
