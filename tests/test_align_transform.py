"""align/transform.py: the similarity against textbook Umeyama and a complex least-squares fit,
the warp against where known points land, the templates against their measurement."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("cv2")

from facefuse.align.transform import (  # noqa: E402
    ARCFACE_TEMPLATE, TEMPLATE_SIZE, TEMPLATES, apply, scale_of, similarity, template, warp)
from facefuse.core.errors import ParameterError  # noqa: E402

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "align_template-cpu2.json"


def umeyama_textbook(x, y):
    """Umeyama (1991), eq. 34-42, as printed: mu, sigma^2, Sigma_xy, SVD, S from det(Sigma_xy)
    (rank m-1 case: from det(U) det(V)), then R, c, t. Column vectors, float64."""
    x, y = np.asarray(x, float).T, np.asarray(y, float).T  # m x n
    m, n = x.shape
    mu_x, mu_y = x.mean(1, keepdims=True), y.mean(1, keepdims=True)
    sigma2_x = np.sum((x - mu_x) ** 2) / n
    cov = (y - mu_y) @ (x - mu_x).T / n
    U, D, Vt = np.linalg.svd(cov)
    S = np.eye(m)
    rank = np.linalg.matrix_rank(cov)
    if rank == m and np.linalg.det(cov) < 0:  # eq. 39
        S[m - 1, m - 1] = -1
    elif rank == m - 1 and np.linalg.det(U) * np.linalg.det(Vt) < 0:  # eq. 43
        S[m - 1, m - 1] = -1
    R = U @ S @ Vt
    c = np.trace(np.diag(D) @ S) / sigma2_x
    t = mu_y - c * R @ mu_x
    return np.hstack([c * R, t])


def complex_fit(x, y):
    """Least squares over z' = a z + b with complex a, b (a rotation-scale, never a reflection)."""
    zx = x[:, 0] + 1j * x[:, 1]
    zy = y[:, 0] + 1j * y[:, 1]
    (a, b), *_ = np.linalg.lstsq(np.column_stack([zx, np.ones_like(zx)]), zy, rcond=None)
    return np.array([[a.real, -a.imag, b.real], [a.imag, a.real, b.imag]])


@pytest.mark.parametrize("n", [2, 3, 5, 7, 13])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_similarity_matches_textbook_umeyama_and_a_complex_fit(n, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(100, 40, (n, 2))
    angle, scale, shift = rng.uniform(-np.pi, np.pi), rng.uniform(0.1, 3), rng.normal(0, 50, 2)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    y = scale * x @ rot.T + shift + rng.normal(0, 2.0, (n, 2))  # noisy
    m = similarity(x, y)
    np.testing.assert_allclose(m, umeyama_textbook(x, y), rtol=1e-9, atol=1e-7)
    np.testing.assert_allclose(m, complex_fit(x, y), rtol=1e-9, atol=1e-7)


def test_exact_similarity_is_recovered_and_a_mirror_is_not_a_reflection():
    x = ARCFACE_TEMPLATE
    angle, scale, shift = 0.4, 2.5, np.array([17.0, -3.0])
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    y = scale * x @ rot.T + shift
    np.testing.assert_allclose(similarity(x, y), np.column_stack([scale * rot, shift]), atol=1e-9)
    mirrored = x * [-1, 1]  # a mirror image of the points: the best *proper* similarity, det > 0
    m = similarity(x, mirrored)
    assert np.linalg.det(m[:, :2]) > 0
    np.testing.assert_allclose(m, umeyama_textbook(x, mirrored), atol=1e-9)
    np.testing.assert_allclose(m, complex_fit(x, mirrored), atol=1e-9)


def test_bad_points_are_refused_in_one_line():
    with pytest.raises(ParameterError, match="landmarks must be spread out"):
        similarity(np.ones((5, 2)), ARCFACE_TEMPLATE)
    with pytest.raises(ParameterError, match="n x 2"):
        similarity(np.ones((5, 3)), np.ones((5, 3)))
    with pytest.raises(ParameterError, match="no measured template"):
        template("sift")
    with pytest.raises(ParameterError, match="size=4"):
        template(next(iter(TEMPLATES)), 4)


def test_templates_are_the_measured_ones():
    measured = json.loads(RESULTS.read_text())["settings"]["templates"]
    assert set(TEMPLATES) == set(measured)
    for name, t in TEMPLATES.items():
        np.testing.assert_allclose(t, measured[name], atol=0.01)
        # and each lies near ArcFace's template, which the lfw-112 crops were made with
        assert np.abs(t - ARCFACE_TEMPLATE).max() < 3.0


def test_template_scales_about_pixel_corners():
    name = next(iter(TEMPLATES))
    np.testing.assert_allclose(template(name, TEMPLATE_SIZE), TEMPLATES[name])
    np.testing.assert_allclose(template(name, 224), (TEMPLATES[name] + 0.5) * 2 - 0.5)


def _dots(size, points, radius=2):
    """A black image with a white square dot centred on each (integer) point."""
    a = np.zeros((size[1], size[0], 3), np.uint8)
    for x, y in np.round(points).astype(int):
        a[y - radius:y + radius + 1, x - radius:x + radius + 1] = 255
    return Image.fromarray(a)


def _centroids(image, near, radius=6):
    a = np.asarray(image.convert("L"), np.float64)
    out = []
    for x, y in near:
        x0, y0 = int(round(x)) - radius, int(round(y)) - radius
        win = a[max(y0, 0):y0 + 2 * radius + 1, max(x0, 0):x0 + 2 * radius + 1]
        yy, xx = np.mgrid[max(y0, 0):y0 + 2 * radius + 1, max(x0, 0):x0 + 2 * radius + 1]
        out.append(((xx * win).sum() / win.sum(), (yy * win).sum() / win.sum()))
    return np.array(out)


@pytest.mark.parametrize("scale", [1.6, 0.9, 0.3, 0.05])  # 0.3 and 0.05 go through the area pre-shrink
def test_warp_puts_points_where_the_matrix_sends_them(scale):
    target = template(next(iter(TEMPLATES)))
    # the photo's points: the template mapped by a known similarity (inverse of the warp's)
    angle = 0.3
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    photo_pts = np.round((target - 56) @ rot.T / scale + [300 / scale ** 0.5, 200 / scale ** 0.5])
    w = int(photo_pts[:, 0].max() + 60 / scale)
    h = int(photo_pts[:, 1].max() + 60 / scale)
    photo = _dots((w, h), photo_pts, radius=max(2, int(2 / scale)))
    m = similarity(photo_pts, target)
    assert scale_of(m) == pytest.approx(scale, rel=0.02)  # the points were rounded
    crop = warp(photo, m, 112)
    assert crop.size == (112, 112) and crop.mode == "RGB"
    expected = apply(m, photo_pts)
    np.testing.assert_allclose(expected, target, atol=scale)  # the photo points were rounded
    np.testing.assert_allclose(_centroids(crop, expected), expected, atol=0.5)


def test_warp_is_black_outside_the_photo():
    photo = Image.new("RGB", (40, 40), (200, 100, 50))
    m = np.array([[1.0, 0, 100], [0, 1.0, 100]])  # the photo lands outside the crop
    assert np.asarray(warp(photo, m, 64)).max() == 0
