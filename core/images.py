"""Image files: which names are images, and decoding any of them (JPEG, PNG, PGM, GIF, 16-bit,
palette, RGBA, ...) to RGB, upright as its EXIF orientation says, with one clear error per bad
file. Also the evaluation transform (resize the short side, centre crop, normalise) that training
validation, export checks and the embedders share, so an image is fed the same way everywhere."""

from __future__ import annotations

import struct
import warnings
from pathlib import Path

import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms import v2

from .errors import BadImageError
from .folders import IGNORED_NAMES, IMAGE_EXTENSIONS, is_image  # noqa: F401  (part of this module's API)

def open_rgb(path: str | Path) -> Image.Image:
    """Decode an image fully and return it as RGB (grey, palette, 16-bit and RGBA are converted),
    turned and mirrored as its EXIF orientation tag (1-8) says, as a photo viewer shows it: a
    portrait phone photo stored sideways comes out upright (:func:`upright`).

    Raises :class:`BadImageError` naming the file for a missing, truncated, corrupt or
    implausibly large image (a header claiming more pixels than PIL's decompression-bomb limit)."""
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()
                return to_rgb(upright(im))
    except FileNotFoundError:
        raise BadImageError(path, "no such file") from None
    except IsADirectoryError:
        raise BadImageError(path, "is a directory, not an image") from None
    except UnidentifiedImageError:
        raise BadImageError(path, "not an image (unrecognised format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadImageError(path, f"too many pixels for a face image ({exc})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadImageError(path, f"corrupt or truncated image ({exc})") from None


def upright(im: Image.Image) -> Image.Image:
    """``im`` as its EXIF orientation tag says it is seen (``PIL.ImageOps.exif_transpose``); the
    image itself when it has no tag, or an EXIF block too damaged to hold one (the pixels are then
    shown as stored, which is what a tag that cannot be read means)."""
    try:
        return ImageOps.exif_transpose(im)
    except (OSError, SyntaxError, ValueError, TypeError, KeyError, IndexError, struct.error):
        return im


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB: 16-bit and float grey scaled down, transparency over black."""
    if im.mode in ("I;16", "I;16B", "I", "F"):
        im = im.point(lambda v: v / 256).convert("L")  # 16-bit / float grey to 8-bit
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        bg = Image.new("RGB", im.size, (0, 0, 0))
        bg.paste(im, mask=im.getchannel("A"))
        return bg
    return im.convert("RGB")


def eval_transform(image_size: int, mean, std) -> v2.Compose:
    """PIL image -> normalised float tensor 3 x S x S: resize the short side, centre crop."""
    return v2.Compose([
        v2.PILToTensor(),
        v2.Resize(image_size, antialias=True),
        v2.CenterCrop(image_size),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(mean), list(std)),
    ])
