"""align/detect.py, mtcnn.py, dlib_detect.py, step.py: real detectors on real faces pasted into
scenes by known similarities, and the clear results of photos that are not one face."""

import pickle

import numpy as np
import pytest
from PIL import Image

cv2 = pytest.importorskip("cv2")

from facefuse.align import DETECTORS, Chain, Face, LandmarkAlign, NoFaceError, get_detector  # noqa: E402
from facefuse.align.detect import make_face  # noqa: E402
from facefuse.align.transform import apply, template  # noqa: E402
from facefuse.core.errors import BadImageError, ParameterError  # noqa: E402
from facefuse.core.images import open_rgb  # noqa: E402

FAST = ["mtcnn", "dlib-hog"]


def _available(name):
    try:
        get_detector(name).model()
    except Exception as exc:  # a missing package: skip with its message
        pytest.skip(f"{name}: {exc}")
    return get_detector(name)


@pytest.fixture(scope="module")
def faces112(lfw):
    """Twelve lfw-112 crops (template-aligned by the data set) of different people."""
    paths = sorted((lfw / "lfw-112").glob("B*/*_0001.jpg"))[:12]
    return [open_rgb(p) for p in paths]


def paste(face: Image.Image, angle: float, scale: float, shift, scene=(400, 300), grey=110):
    """``face`` warped into a grey scene by the similarity ``p -> scale R(angle) p + shift``: the
    scene and that 2 x 3 matrix (crop pixels -> scene pixels)."""
    c, s = np.cos(angle), np.sin(angle)
    m = np.array([[scale * c, -scale * s, shift[0]], [scale * s, scale * c, shift[1]]])
    a = cv2.warpAffine(np.asarray(face), m, scene, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                       borderValue=(grey,) * 3)
    mask = cv2.warpAffine(np.full(face.size[::-1], 255, np.uint8), m, scene, flags=cv2.INTER_NEAREST)
    bg = np.full_like(a, grey)
    return Image.fromarray(np.where(mask[..., None] > 0, a, bg)), m


@pytest.mark.parametrize("name", FAST)
def test_a_pasted_face_is_aligned_back_to_where_it_came_from(name, faces112):
    """Paste a template-aligned face by a known similarity P; the alignment A found in the scene
    must undo it: A(P(p)) ~ A0(p), A0 being the alignment of the unpasted crop (close to identity)."""
    step = LandmarkAlign(_available(name), size=112)
    points = template(name)  # where the face is: the errors there, in crop pixels
    errors = []
    for k, face in enumerate(faces112):
        angle, scale = np.deg2rad(-12 + 2 * k), 1.3 + 0.1 * k
        scene, p = paste(face, angle, scale, (120 + 5 * k, 40 + 3 * k))
        base = step.detect(face)
        found = step.detect(scene)
        if not base or not found:
            continue
        a, a0 = step.matrix(found[0]), step.matrix(base[0])
        composed = apply(a, apply(p, points))
        errors.append(np.linalg.norm(composed - apply(a0, points), axis=1).max())
        assert found[0].box[0] < p[0, 2] + 112 * scale and found[0].detector == name
    assert len(errors) >= 9, f"{name} found {len(errors)} of 12 pasted faces"
    assert np.median(errors) < 2.5 and max(errors) < 5.0  # crop pixels (of 112); eyes 35 px apart
    # the crop itself: the pasted face comes back close to the original crop
    scene, p = paste(faces112[0], 0.2, 1.7, (150, 60))
    back = np.asarray(step(scene), float)
    assert np.abs(back - np.asarray(faces112[0], float))[16:96, 16:96].mean() < 25


@pytest.mark.parametrize("name", FAST)
def test_photos_that_are_not_one_face_give_clear_results(name, faces112):
    step = LandmarkAlign(_available(name), size=64)
    grey = Image.new("RGB", (320, 240), (128, 128, 128))
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8))
    for photo in (grey, noise, Image.new("RGB", (1, 1)), Image.new("L", (50, 30), 90)):
        got = step.align(photo)
        assert not got.found and got.n_faces == 0 and got.image is photo and step(photo) is photo
        assert step.faces(photo) == []
    with pytest.raises(NoFaceError, match=r"^no face found in the 320x240 image$"):
        LandmarkAlign(name, on_none="error").align(grey)
    # five people in one photo: each found, each aligned, the largest first
    scene = Image.new("RGB", (900, 300), (110, 110, 110))
    for k, face in enumerate(faces112[:5]):
        side = 120 + 10 * k
        scene.paste(face.resize((side, side), Image.BILINEAR), (10 + 175 * k, 40))
    aligned = step.faces(scene)
    assert len(aligned) == 5
    assert all(im.size == (64, 64) for _, im in aligned)
    areas = [f.area for f, _ in aligned]
    assert areas == sorted(areas, reverse=True) and aligned[0].face.box[0] > 600  # the last pasted is largest
    whole = step.align(scene)
    assert whole.n_faces == 5 and whole.face.box == aligned[0].face.box
    # a tiny face (14 px) is not looked for: no face, no error
    tiny = Image.new("RGB", (300, 200), (110, 110, 110))
    tiny.paste(faces112[1].resize((14, 14)), (140, 90))
    assert step.detect(tiny) == []


def test_a_huge_photo_is_detected_on_a_smaller_copy_and_aligned_from_the_full_one(faces112):
    step = LandmarkAlign(_available("mtcnn"), size=112)
    scene, p = paste(faces112[2], 0.1, 14.0, (1500, 400), scene=(5000, 2500))
    found = step.align(scene)
    assert found.found and found.n_faces == 1
    assert max(found.face.box) > 1600  # coordinates of the full photo, not of the detection copy
    base = step.matrix(step.detect(faces112[2])[0])
    corners = np.array([[0, 0], [111, 111]], float)
    assert np.abs(apply(found.matrix, apply(p, corners)) - apply(base, corners)).max() < 4


def test_an_image_over_the_pixel_limit_is_one_line_error(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("RGB", (400, 300)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # 400 x 300 is then > 2x the limit
    with pytest.raises(BadImageError, match="too many pixels") as info:
        open_rgb(path)
    assert "\n" not in str(info.value)


class _Fixed:
    """A stand-in detector: fixed faces."""

    members = ["mtcnn"]

    def __init__(self, faces):
        self.faces, self.name, self.calls = faces, "mtcnn", 0

    def detect(self, image):
        self.calls += 1
        return list(self.faces)


def test_chain_asks_the_second_detector_only_when_the_first_finds_nothing():
    face = make_face((0, 0, 10, 10), 0.9, np.arange(10, dtype=float).reshape(5, 2) * [3, 1], "mtcnn")
    none, one = _Fixed([]), _Fixed([face])
    im = Image.new("RGB", (20, 20))
    assert Chain([none, one]).detect(im) == [face] and none.calls == one.calls == 1
    assert Chain([one, none]).detect(im) == [face] and none.calls == 1
    with pytest.raises(ParameterError, match="at least one"):
        Chain([])
    chain = get_detector("dlib-hog+mtcnn")
    assert isinstance(chain, Chain) and chain.name == "dlib-hog+mtcnn" and chain.members == ["dlib-hog", "mtcnn"]
    assert LandmarkAlign(chain).detector is chain


def test_registry_options_pickling_and_bad_arguments():
    assert {"mtcnn", "dlib-hog", "dlib-cnn"} <= set(DETECTORS.names())
    with pytest.raises(ParameterError, match="detector=sift: unknown; valid: mtcnn, dlib-hog"):
        LandmarkAlign("sift")
    with pytest.raises(ParameterError, match="on_none=skip"):
        LandmarkAlign("mtcnn", on_none="skip")
    with pytest.raises(ParameterError, match="size=3"):
        LandmarkAlign("mtcnn", size=3)
    with pytest.raises(ParameterError, match="min_face=5"):
        get_detector("mtcnn", min_face=5)
    step = LandmarkAlign("mtcnn", size=96)
    step.detector._model = object()  # as if loaded: never pickled
    clone = pickle.loads(pickle.dumps(step))
    assert clone.detector._model is None and clone.size == 96 and clone.detector.min_face == 20
    with pytest.raises(ParameterError, match="image="):
        step.detect(np.zeros((10, 10, 3)))


def test_face_to_dict_is_json_ready():
    f = make_face((1.234, 2, 30, 40.5), 0.99991, np.arange(10).reshape(5, 2), "mtcnn")
    d = f.to_dict()
    assert d == {"box": [1.23, 2.0, 30.0, 40.5], "score": 0.9999, "detector": "mtcnn",
                 "landmarks": [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]}
    assert isinstance(f, Face) and f.area == pytest.approx(28.766 * 38.5)


def test_a_template_crop_is_resized_not_warped_again(faces112):
    """lfw-112 crops are on the template already: passed through (resized), not re-warped by the
    detector's landmark scatter; a crop moved off the template, or snap=0, is warped."""
    step = LandmarkAlign(_available("mtcnn"), size=112)
    framed = [step.align(face) for face in faces112]
    assert sum(a.framed for a in framed) >= 10
    for face, a in zip(faces112, framed):
        if a.framed:
            assert a.matrix is None and np.array_equal(np.asarray(a.image), np.asarray(face))
    small = LandmarkAlign("mtcnn", size=64).align(faces112[0])
    assert small.framed and small.image.size == (64, 64)
    moved = Image.fromarray(np.roll(np.asarray(faces112[0]), 14, axis=1))  # 14 px right: 0.4 of the eyes' distance
    got = step.align(moved)
    assert not got.framed and got.matrix is not None and got.matrix[0, 2] == pytest.approx(-14, abs=4)
    always = LandmarkAlign("mtcnn", size=112, snap=0).align(faces112[0])
    assert not always.framed and always.matrix is not None
    with pytest.raises(ParameterError, match="snap=1"):
        LandmarkAlign("mtcnn", snap=1)
