"""The alignment step: a photo in, its face(s) warped onto the template square out.

:class:`LandmarkAlign` is what every stage calls (embedding, search, ``facefuse align``): it
detects faces with five landmarks (:mod:`facefuse.align.detect`), takes the largest, and warps it
by the least-squares similarity onto its detector's template (:mod:`facefuse.align.transform`).
It is picklable (its detector loads its weights again in each worker process) and holds no
per-image state, so one object serves every DataLoader worker.

Policies, chosen so that a caller always learns what happened:

- no face: ``__call__`` returns the photo unchanged (the model's own resize and centre crop then
  see the whole photo, as with no alignment), and :meth:`align` says so (``face is None``), so a
  caller can count, refuse or note it; ``on_none="error"`` raises :class:`NoFaceError` instead;
- several faces: the largest box is aligned; :meth:`align` reports how many were found, and
  :meth:`faces` aligns every one (search identifies each face of a photo);
- a photo that is a template crop already (square, its landmarks within ``snap`` of the template
  when resized whole: :meth:`LandmarkAlign.framed`) is resized, not warped again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from PIL import Image

from facefuse.core.errors import FacefuseError, ParameterError

from .detect import Face, as_detector
from .transform import similarity, template, warp

DEFAULT_DETECTOR = "mtcnn"
ON_NONE = ("whole", "error")
SNAP = 0.15  # LandmarkAlign.framed: a fraction of the template's eye distance (5.3 px of 112)


class NoFaceError(FacefuseError):
    """No face was found in a photo (raised only where a policy asks for it)."""


class AlignedFace(NamedTuple):
    """One detected face and its aligned ``size`` x ``size`` crop (unpacks as ``face, image``)."""

    face: Face
    image: Image.Image


@dataclass(frozen=True)
class Alignment:
    """What :meth:`LandmarkAlign.align` did to one photo: ``image`` (the aligned crop, or the photo
    itself when no face was found), ``face`` (the one aligned, or None), ``n_faces`` (how many
    were detected), ``matrix`` (the 2 x 3 photo-to-crop similarity, or None) and ``framed`` (the
    photo was a template crop already: resized, not warped; ``matrix`` is then None)."""

    image: Image.Image
    face: Face | None
    n_faces: int
    matrix: np.ndarray | None = None
    framed: bool = False

    @property
    def found(self) -> bool:
        return self.face is not None


class LandmarkAlign:
    """``detector``: a registered name (:data:`facefuse.align.detect.DETECTORS`) or a detector
    object; ``size``: the crop's side in pixels (the template is scaled to it: 112 for training
    crops, the model's input side for embedding); ``on_none``: ``"whole"`` (the photo is passed on
    unchanged) or ``"error"`` (:class:`NoFaceError`); ``snap``: a square photo framed as the
    template already (:meth:`framed`) is resized, not warped (0: always warp)."""

    def __init__(self, detector=DEFAULT_DETECTOR, size: int = 112, on_none: str = "whole", snap: float = SNAP):
        if on_none not in ON_NONE:
            raise ParameterError("on_none", on_none, f"valid: {', '.join(ON_NONE)}")
        if not 0 <= snap < 1:
            raise ParameterError("snap", snap, "must be in [0, 1) (a fraction of the eyes' distance)")
        self.detector = as_detector(detector)
        self.size = int(size)
        self.on_none = on_none
        self.snap = float(snap)
        for name in self.detector.members:  # refuses a bad size or a detector without a template
            template(name, self.size)

    def detect(self, image: Image.Image) -> list[Face]:
        """Every face found, largest first."""
        return self.detector.detect(image)

    def matrix(self, face: Face) -> np.ndarray:
        """The 2 x 3 similarity taking ``face``'s landmarks onto its detector's template."""
        return similarity(face.landmarks, template(face.detector, self.size))

    def framed(self, image: Image.Image, face: Face) -> bool:
        """Whether a square ``image`` is a template crop already: resized whole to the crop's
        side, its ``face``'s landmarks lie within ``snap`` x the template's eye distance of the
        template (mean over the five points). Warping such a photo would move it by the
        detector's own landmark scatter (about 0.07 of the eye distance for MTCNN on lfw-112) and
        resample it, which costs verification more than it gains (benchmarks/align_detectors.py)."""
        if not self.snap or image.width != image.height:
            return False
        target = template(face.detector, self.size)
        resized = (face.landmarks.astype(np.float64) + 0.5) * (self.size / image.width) - 0.5
        eyes = np.linalg.norm(target[1] - target[0])
        return bool(np.linalg.norm(resized - target, axis=1).mean() <= self.snap * eyes)

    def crop(self, image: Image.Image, face: Face) -> Image.Image:
        """``face`` of ``image`` warped onto the template square (resized, when :meth:`framed`)."""
        if self.framed(image, face):
            return image.copy() if image.width == self.size else image.resize((self.size,) * 2, Image.BILINEAR)
        return warp(image, self.matrix(face), self.size)

    def faces(self, image: Image.Image) -> list[AlignedFace]:
        """Every detected face with its aligned crop, largest first (empty when none is found)."""
        return [AlignedFace(f, self.crop(image, f)) for f in self.detect(image)]

    def align(self, image: Image.Image) -> Alignment:
        """The largest face aligned, with what was found (see the module docstring's policies)."""
        found = self.detect(image)
        if not found:
            if self.on_none == "error":
                raise NoFaceError(f"no face found in the {image.width}x{image.height} image")
            return Alignment(image, None, 0)
        if self.framed(image, found[0]):
            return Alignment(self.crop(image, found[0]), found[0], len(found), None, framed=True)
        m = self.matrix(found[0])
        return Alignment(warp(image, m, self.size), found[0], len(found), m)

    def __call__(self, image: Image.Image) -> Image.Image:
        return self.align(image).image

    def __repr__(self) -> str:
        return (f"LandmarkAlign(detector={self.detector!r}, size={self.size}, on_none={self.on_none!r}, "
                f"snap={self.snap})")
