"""Face crop for photos that are not aligned to the 112 x 112 face template (``align="haar"``).

The models here are trained on template-aligned faces (LFW's aligned crops: eyes, nose and mouth
at fixed places). A photo framed otherwise, a whole head with hair and background (ORL) or a
320 x 243 scene (Yale), reaches the model zoomed out, and its embedding suffers. This module finds
the largest frontal face with OpenCV's Viola-Jones (Haar cascade) detector, the classical one that
ships with ``opencv-python-headless`` 4.x (a boosted cascade of pixel-difference features, not a
learned embedding; no model weights are downloaded), and crops the square the template would
cover: on template-aligned LFW images the detector's box has a stable place and size
(:data:`TEMPLATE_BOX`, measured by ``benchmarks/face_crop.py``), so a box found in any photo maps
back to the template's square by the same similarity. Parts of the square outside the photo are
black, as outside an aligned crop. A photo where no face is found is passed on whole (the plain
resize), and :func:`detect_rate` counts those.

The crop is not an alignment: it corrects scale and position, not in-plane rotation.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from facefuse.core.errors import FacefuseError, ParameterError

# The detector's box on template-aligned 112 x 112 LFW faces: centre x, centre y, side (pixels),
# medians over the images of benchmarks/face_crop.py (results/face_crop-cpu2.json, "template_box");
# tests/test_facecrop.py checks these equal that file.
TEMPLATE_SIZE = 112
TEMPLATE_BOX = (55.0, 61.0, 86.0)


def _cascade():
    try:
        import cv2
    except ImportError:
        raise ParameterError("align", "haar", "needs OpenCV: pip install 'opencv-python-headless>=4.8,<5'") from None
    path = cv2.data.haarcascades + "haarcascade_frontalface_default.xml"
    det = cv2.CascadeClassifier(path)
    if det.empty():
        raise FacefuseError(f"OpenCV {cv2.__version__} has no Haar face cascade ({path}); "
                            "install opencv-python-headless 4.x (5.x dropped the cascades)")
    return det


class HaarFaceCrop:
    """``crop(image)``: the template square around the largest face, or the image unchanged when no
    face is found (``box(image)`` is then None). ``min_face``: the smallest face searched for, as a
    fraction of the photo's shorter side. Picklable (each DataLoader worker builds its detector)."""

    def __init__(self, min_face: float = 0.2, template_box=TEMPLATE_BOX, template_size: int = TEMPLATE_SIZE):
        if not 0 < min_face <= 1:
            raise ValueError(f"min_face must be in (0, 1], got {min_face}")
        self.min_face = float(min_face)
        self.template_box = tuple(float(v) for v in template_box)
        self.template_size = int(template_size)
        self._det = None

    def __getstate__(self):
        return {**self.__dict__, "_det": None}

    def box(self, image: Image.Image) -> tuple[int, int, int, int] | None:
        """The largest detected face ``(x, y, w, h)`` in pixels, or None."""
        if self._det is None:
            self._det = _cascade()
        grey = np.asarray(image.convert("L"))
        side = max(1, int(min(grey.shape) * self.min_face))
        found = self._det.detectMultiScale(grey, scaleFactor=1.1, minNeighbors=5, minSize=(side, side))
        if len(found) == 0:
            return None
        x, y, w, h = max(found, key=lambda b: int(b[2]) * int(b[3]))
        return int(x), int(y), int(w), int(h)

    def crop_box(self, face: tuple[int, int, int, int]) -> tuple[float, float, float, float]:
        """The template square ``(left, top, right, bottom)`` for a detected face box."""
        x, y, w, h = face
        cx, cy, side = self.template_box
        scale = w / side  # photo pixels per template pixel
        left = x + w / 2 - cx * scale
        top = y + h / 2 - cy * scale
        size = self.template_size * scale
        return left, top, left + size, top + size

    def crop_face(self, image: Image.Image, face: tuple[int, int, int, int]) -> Image.Image:
        """The template square of ``image`` around the detected ``face`` (outside the photo: black)."""
        return image.crop(tuple(int(round(v)) for v in self.crop_box(face)))

    def __call__(self, image: Image.Image) -> Image.Image:
        face = self.box(image)
        return image if face is None else self.crop_face(image, face)


def detect_rate(crop: HaarFaceCrop, paths) -> tuple[int, int]:
    """``(found, total)``: how many of the images have a detected face."""
    from facefuse.core.images import open_rgb

    paths = list(paths)
    return sum(crop.box(open_rgb(p)) is not None for p in paths), len(paths)
