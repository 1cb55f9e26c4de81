"""core/facecrop.py: the Haar face crop (--detect haar) that maps a detected box to the template square."""

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("cv2")

from facefuse.core.errors import FacefuseError  # noqa: E402
from facefuse.core.facecrop import TEMPLATE_BOX, TEMPLATE_SIZE, HaarFaceCrop  # noqa: E402
from facefuse.core.settings import EmbedSettings  # noqa: E402
from facefuse.export.runtime import face_step  # noqa: E402

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "face_crop-cpu2.json"


def test_template_box_is_the_measured_one():
    measured = json.loads(RESULTS.read_text())["settings"]["template_box"]
    assert TEMPLATE_BOX == pytest.approx(measured, abs=0.5)


def test_crop_box_is_the_similarity_that_maps_the_template_box_back():
    crop = HaarFaceCrop()
    cx, cy, side = TEMPLATE_BOX
    on_template = (cx - side / 2, cy - side / 2, side, side)
    assert crop.crop_box(on_template) == pytest.approx((0, 0, TEMPLATE_SIZE, TEMPLATE_SIZE))
    # the same face twice as large, 30 px right and 10 px down: twice the square, shifted
    doubled = (2 * (cx - side / 2) + 30, 2 * (cy - side / 2) + 10, 2 * side, 2 * side)
    assert crop.crop_box(doubled) == pytest.approx((30, 10, 30 + 2 * TEMPLATE_SIZE, 10 + 2 * TEMPLATE_SIZE))


def test_no_face_passes_the_image_on_and_bad_settings_are_refused():
    blank = Image.new("RGB", (90, 70), (128, 128, 128))
    crop = HaarFaceCrop()
    assert crop.box(blank) is None and crop(blank) is blank
    with pytest.raises(FacefuseError, match="align=sift: unknown alignment; valid: none, haar, landmarks, auto"):
        EmbedSettings(align="sift")
    assert face_step("none") is None and isinstance(face_step("haar"), HaarFaceCrop)
    with pytest.raises(ValueError, match="min_face"):
        HaarFaceCrop(min_face=0)
    clone = pickle.loads(pickle.dumps(crop))  # DataLoader workers: no OpenCV object crosses
    assert clone._det is None and clone.box(blank) is None


def test_a_zoomed_out_face_is_cropped_back_to_its_aligned_frame(lfw):
    """An aligned LFW face pasted small into a larger grey scene: the crop lands where it was pasted."""
    aligned = sorted((lfw / "lfw-112").glob("A*/*.jpg"))[:12]
    crop = HaarFaceCrop()
    hits = []
    for k, path in enumerate(aligned):
        face = Image.open(path).convert("RGB")
        size, left, top = 150 + 7 * k, 40 + 5 * k, 20 + 3 * k
        scene = Image.new("RGB", (320, 240), (110, 110, 110))
        scene.paste(face.resize((size, size), Image.BILINEAR), (left, top))
        box = crop.box(scene)
        if box is None:
            continue
        l, t, r, b = crop.crop_box(box)
        hits.append(((l - left) / size, (t - top) / size, (r - l) / size))
        found_scene, found_size = scene, size
    assert len(hits) >= 10  # the detector finds most faces
    err = np.abs(np.array(hits) - [0, 0, 1])
    assert np.median(err, axis=0).max() < 0.06  # within 6% of the face size: scale and place recovered
    cropped = crop(found_scene)
    assert abs(cropped.size[0] - found_size) < 0.15 * found_size and cropped.size[0] == cropped.size[1]
