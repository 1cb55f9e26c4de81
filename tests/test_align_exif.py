"""core/images.open_rgb honours the EXIF orientation (tags 1-8) as PIL.ImageOps.exif_transpose
does, and as the EXIF specification's table says."""

import numpy as np
import pytest
from PIL import Image, ImageOps

from facefuse.core.images import open_rgb

# EXIF 2.3, tag 0x0112: how the stored pixels are turned to be seen upright (numpy on H x W x C)
SPEC = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],                 # mirrored left-right
    3: lambda a: a[::-1, ::-1],              # turned 180
    4: lambda a: a[::-1],                    # mirrored top-bottom
    5: lambda a: a.transpose(1, 0, 2),       # mirrored about the main diagonal
    6: lambda a: np.rot90(a, -1),            # stored turned 90 counter-clockwise: turn clockwise
    7: lambda a: np.rot90(a, 2).transpose(1, 0, 2),  # mirrored about the anti-diagonal
    8: lambda a: np.rot90(a, 1),             # stored turned 90 clockwise: turn counter-clockwise
}


def _pattern(w=48, h=32):
    """Blocks of 8 x 8 (whole JPEG blocks, so q=100 keeps them), no two alike, no symmetry."""
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
    return np.kron(blocks, np.ones((8, 8, 1), np.uint8))


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_exif_orientation_is_applied(tmp_path, orientation, fmt):
    stored = _pattern()
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"o{orientation}.{fmt.lower()}"
    lossless = {"quality": 100, "subsampling": 0} if fmt == "JPEG" else {}
    Image.fromarray(stored).save(path, format=fmt, exif=exif, **lossless)
    got = np.asarray(open_rgb(path))
    with Image.open(path) as im:
        reference = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
        decoded = np.asarray(im.convert("RGB"))
    np.testing.assert_array_equal(got, reference)
    expected = SPEC[orientation](decoded)
    assert got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)
    if orientation in (5, 6, 7, 8):
        assert got.shape[:2] == stored.shape[1::-1]  # a portrait stored sideways comes out upright


def test_no_exif_and_a_damaged_exif_leave_the_pixels_as_stored(tmp_path):
    stored = _pattern()
    plain = tmp_path / "plain.png"
    Image.fromarray(stored).save(plain)
    np.testing.assert_array_equal(np.asarray(open_rgb(plain)), stored)
    damaged = tmp_path / "damaged.jpg"
    Image.fromarray(stored).save(damaged, quality=100, subsampling=0, exif=b"Exif\x00\x00II*\x00\xff\xff\xff\x7f")
    got = open_rgb(damaged)  # an EXIF block that cannot be read holds no orientation: as stored
    assert got.size == (stored.shape[1], stored.shape[0])
