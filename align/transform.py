"""Similarity alignment: five landmarks onto a template, and the warp to a square crop.

:func:`similarity` is Umeyama's least-squares estimate (Umeyama 1991, "Least-squares estimation of
transformation parameters between two point patterns", eq. 40-42) restricted to a proper
similarity: rotation, one scale, shift, never a reflection. With source points ``x_i`` and
target points ``y_i`` (n of them, means ``mx``, ``my``), ``Sigma = (1/n) sum (y_i - my)(x_i - mx)^T
= U D V^T`` (SVD), ``S = diag(1, det(U) det(V))``:

    R = U S V^T,    c = trace(D S) / sigma_x^2,    t = my - c R mx,    sigma_x^2 = (1/n) sum |x_i - mx|^2

and ``y ~ c R x + t`` minimises ``sum |y_i - (c R x_i + t)|^2``. The 2 x 3 matrix ``[c R | t]``
maps the photo's pixel coordinates to the crop's, and :func:`warp` resamples the photo through
it (bilinear, black outside the photo; a photo shrunk more than :data:`PRESHRINK_BELOW` is first
area-averaged to the crop's scale, so a large photo does not alias).

Templates: where each detector puts the five landmarks on LFW's template-aligned 112 x 112 crops
(``lfw-112``, made by the data set's own aligner onto ArcFace's template), the median over the
LFW identities outside fold 0, measured by ``benchmarks/align_template.py``
(``benchmarks/results/align_template-cpu2.json``, ``templates``; ``tests/test_align_transform.py``
checks these constants equal that file). Aligning a photo onto the template of the detector that
found its face puts the face where the model saw faces in training, whatever that detector's
landmark conventions are. A template for another square side ``S`` is the 112 one scaled about
pixel corners: ``(p + 0.5) * S / 112 - 0.5``.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from facefuse.core.errors import ParameterError

TEMPLATE_SIZE = 112
# ArcFace's 112 x 112 five-point template (insightface), the target of the lfw-112 crops: a reference.
ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                             [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float64)
# Per detector: median landmarks on lfw-112 (see the module docstring for the provenance).
TEMPLATES: dict[str, np.ndarray] = {
    "mtcnn": np.array([[37.83, 51.93], [73.39, 51.65], [55.41, 72.54], [40.7, 90.78], [71.01, 90.53]]),
    "dlib-hog": np.array([[37.5, 52.5], [72.5, 52.33], [55.0, 71.0], [40.0, 91.0], [71.0, 90.0]]),
    "dlib-cnn": np.array([[37.5, 52.5], [72.5, 52.33], [55.0, 71.0], [40.0, 90.5], [70.0, 90.0]]),
}
PRESHRINK_BELOW = 0.8


def template(detector: str, size: int = TEMPLATE_SIZE) -> np.ndarray:
    """The 5 x 2 template of ``detector`` for a ``size`` x ``size`` crop (float64)."""
    if detector not in TEMPLATES:
        raise ParameterError("detector", detector, f"no measured template; templates: {', '.join(TEMPLATES)}")
    if not (isinstance(size, (int, np.integer)) and size >= 8):
        raise ParameterError("size", size, "the crop's side must be an integer >= 8 pixels")
    return (TEMPLATES[detector] + 0.5) * (size / TEMPLATE_SIZE) - 0.5


def similarity(src, dst) -> np.ndarray:
    """The 2 x 3 least-squares similarity (no reflection) taking points ``src`` (n x 2) to ``dst``."""
    x = np.asarray(src, dtype=np.float64)
    y = np.asarray(dst, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 2 or x.shape[1] != 2 or x.shape[0] < 2:
        raise ParameterError("src", f"shape {x.shape} vs dst {y.shape}", "need two n x 2 arrays, n >= 2")
    mx, my = x.mean(0), y.mean(0)
    xc, yc = x - mx, y - my
    var = (xc ** 2).sum(1).mean()
    if not np.isfinite(var) or var <= 1e-12:
        raise ParameterError("src", "coincident points", "landmarks must be spread out")
    u, d, vt = np.linalg.svd(yc.T @ xc / x.shape[0])
    s = np.array([1.0, np.sign(np.linalg.det(u) * np.linalg.det(vt)) or 1.0])
    r = u @ np.diag(s) @ vt
    c = (d * s).sum() / var
    return np.column_stack([c * r, my - c * r @ mx])


def scale_of(matrix: np.ndarray) -> float:
    """The scale of a 2 x 3 similarity (crop pixels per photo pixel)."""
    return float(np.sqrt(abs(np.linalg.det(np.asarray(matrix)[:, :2]))))


def apply(matrix: np.ndarray, points) -> np.ndarray:
    """Points (n x 2) mapped through a 2 x 3 affine matrix."""
    p = np.asarray(points, dtype=np.float64)
    return p @ np.asarray(matrix)[:, :2].T + np.asarray(matrix)[:, 2]


def warp(image: Image.Image, matrix: np.ndarray, size: int) -> Image.Image:
    """The ``size`` x ``size`` RGB crop ``out(p) = image(M^-1 p)`` (bilinear, black outside)."""
    import cv2

    rgb = np.asarray(image.convert("RGB") if image.mode != "RGB" else image)
    m = np.asarray(matrix, dtype=np.float64)
    scale = scale_of(m)
    if scale < PRESHRINK_BELOW:  # area-average first: bilinear alone would alias a large photo
        h, w = rgb.shape[:2]
        sw, sh = max(1, round(w * scale)), max(1, round(h * scale))
        fx, fy = sw / w, sh / h
        rgb = cv2.resize(rgb, (sw, sh), interpolation=cv2.INTER_AREA)
        # small pixel u = (x + 0.5) * f - 0.5, so x = (u + 0.5) / f - 0.5
        back = np.array([[1 / fx, 0, 0.5 / fx - 0.5], [0, 1 / fy, 0.5 / fy - 0.5], [0, 0, 1]])
        m = m @ back
    out = cv2.warpAffine(np.ascontiguousarray(rgb), m, (size, size), flags=cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))
    return Image.fromarray(out)
