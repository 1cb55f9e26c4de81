"""dlib's face detectors with its 68-point shape model, reduced to the five template landmarks.

- ``dlib-hog``: the HOG + linear SVM detector (``get_frontal_face_detector``: five filters,
  frontal and turned left / right), built into dlib;
- ``dlib-cnn``: the max-margin object detector CNN (``mmod_human_face_detector.dat``).

Both boxes go to the 68-point shape predictor (iBUG 300-W markup,
``shape_predictor_68_face_landmarks.dat``); the five points are the centre of each eye's six
eyelid points (36-41, 42-47), the nose tip (30) and the mouth corners (48, 54). dlib comes from
the ``dlib-bin`` wheel, the two model files from the ``face-recognition-models`` package (never
imported: its ``__init__`` needs ``pkg_resources``; its folder is found by name).
"""

from __future__ import annotations

import importlib.util
from abc import abstractmethod
from pathlib import Path

import numpy as np
from PIL import Image

from .detect import DETECTORS, LazyModel, check_image, downscale_for_detection, largest_first, make_face, \
    missing_package, rgb_array, scale_faces

SHAPE_MODEL = "shape_predictor_68_face_landmarks.dat"
FIVE_OF_68 = ((36, 37, 38, 39, 40, 41), (42, 43, 44, 45, 46, 47), (30,), (48,), (54,))


def models_dir() -> Path:
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise missing_package("face-recognition-models", "the dlib detectors")
    return Path(spec.submodule_search_locations[0]) / "models"


def _dlib():
    try:
        import dlib
    except ImportError:
        raise missing_package("dlib-bin", "the dlib detectors") from None
    return dlib


def five_points(shape) -> np.ndarray:
    """5 x 2 float32 template landmarks from a dlib 68-point ``full_object_detection``."""
    pts = np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float32)
    return np.stack([pts[list(idx)].mean(0) for idx in FIVE_OF_68])


class _DlibDetector(LazyModel):
    """``upsample``: times the image is doubled before detection (HOG sees faces from about 80 px,
    40 px after one doubling); ``max_side``: a longer photo is detected on a copy scaled down to it."""

    def __init__(self, upsample: int = 1, max_side: int = 1600):
        super().__init__()
        if upsample not in (0, 1, 2):
            from facefuse.core.errors import ParameterError

            raise ParameterError("upsample", upsample, "must be 0, 1 or 2")
        self.upsample = int(upsample)
        self.max_side = int(max_side)

    def detect(self, image: Image.Image):
        check_image(image)
        rgb, back = downscale_for_detection(rgb_array(image), self.max_side)
        rgb = np.ascontiguousarray(rgb)
        predictor = self.model()[1]
        faces = []
        for rect, score in self.boxes(rgb):
            box = (rect.left(), rect.top(), rect.right() + 1, rect.bottom() + 1)
            faces.append(make_face(box, score, five_points(predictor(rgb, rect)), self.name))
        return largest_first(scale_faces(faces, back))

    @abstractmethod
    def boxes(self, rgb):
        """dlib's face rectangles and scores in ``rgb`` (each dlib detector its own way)."""


@DETECTORS.register("dlib-hog")
class DlibHOG(_DlibDetector):
    name = "dlib-hog"

    def load(self):
        dlib = _dlib()
        return dlib.get_frontal_face_detector(), dlib.shape_predictor(str(models_dir() / SHAPE_MODEL))

    def boxes(self, rgb):
        rects, scores, _ = self.model()[0].run(rgb, self.upsample, 0.0)
        return list(zip(rects, scores))


@DETECTORS.register("dlib-cnn")
class DlibCNN(_DlibDetector):
    name = "dlib-cnn"

    def load(self):
        dlib = _dlib()
        root = models_dir()
        return (dlib.cnn_face_detection_model_v1(str(root / "mmod_human_face_detector.dat")),
                dlib.shape_predictor(str(root / SHAPE_MODEL)))

    def boxes(self, rgb):
        return [(d.rect, d.confidence) for d in self.model()[0](rgb, self.upsample)]
