"""Uploaded bytes -> an upright RGB photo, with the same checks as ``core.images.open_rgb`` plus the
service's own pixel limit, checked on the header before any pixel is decoded.

Errors are :class:`UploadError` with the HTTP status the service answers with: 413 for too many
pixels (a decompression bomb included), 422 for bytes that are not a readable image."""

from __future__ import annotations

import io
import warnings

from PIL import Image, UnidentifiedImageError

from facefuse.core.errors import FacefuseError
from facefuse.core.images import to_rgb, upright


class UploadError(FacefuseError):
    """A bad upload: ``status`` is the HTTP code to answer with, the message one line."""

    def __init__(self, status: int, message: str):
        self.status = status
        super().__init__(message)


def decode_photo(data: bytes, field: str, max_pixels: int) -> Image.Image:
    """Decode upload ``field`` (its bytes) fully to RGB, turned as its EXIF orientation says.

    The header's size is checked against ``max_pixels`` (and PIL's decompression-bomb limit)
    before decoding, then the pixels go through ``core.images``' own conversion (``to_rgb``)."""
    if not data:
        raise UploadError(422, f"{field}: empty upload")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise UploadError(413, f"{field}: {w}x{h} is {w * h} pixels, more than the limit of {max_pixels}")
                if w < 1 or h < 1:
                    raise UploadError(422, f"{field}: empty image ({w}x{h})")
                im.load()
                return to_rgb(upright(im))
    except UnidentifiedImageError:
        raise UploadError(422, f"{field}: not an image (unrecognised format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise UploadError(413, f"{field}: too many pixels for a face image ({exc})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise UploadError(422, f"{field}: corrupt or truncated image ({_first_line(exc)})") from None


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:160] if text else type(exc).__name__
