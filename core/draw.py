"""A searched photo drawn with its answer: each face's box and name (``facefuse search --draw``)."""

from __future__ import annotations

from pathlib import Path

from PIL import ImageDraw, ImageFont

from .errors import ParameterError
from .files import atomic_path
from .images import open_rgb

KNOWN, UNKNOWN = (40, 200, 90), (230, 60, 50)


def draw_faces(photo, result, out) -> Path:
    """Write ``photo`` (a path) with a box and ``identity score`` label per face of ``result`` (a
    search result with ``faces``, or one answer for the whole photo) to ``out``, atomically; the
    format follows ``out``'s suffix."""
    out = Path(out)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP"}.get(out.suffix.lower())
    if fmt is None or out.is_dir():
        raise ParameterError("draw", out, "give a .jpg, .png or .webp file name" + (" (it is a folder)" if fmt else ""))
    im = open_rgb(photo)
    pen = ImageDraw.Draw(im)
    width = max(2, round(min(im.size) / 150))
    font = ImageFont.load_default(size=max(12, round(min(im.size) / 25)))
    faces = result.faces if result.faces is not None else [result]
    for face in faces:
        box = getattr(face, "box", None) or (0, 0, im.width - 1, im.height - 1)
        colour = UNKNOWN if face.identity == "unknown" else KNOWN
        pen.rectangle([round(v) for v in box], outline=colour, width=width)
        label = face.identity + (f" {face.score:.2f}" if face.score is not None else "")
        x, y = box[0], max(0, box[1] - font.size - 2 * width)
        pen.rectangle(pen.textbbox((x, y), label, font=font), fill=colour)
        pen.text((x, y), label, fill=(255, 255, 255), font=font)
    with atomic_path(out) as tmp:
        im.save(tmp, format=fmt, quality=92) if fmt == "JPEG" else im.save(tmp, format=fmt)
    return out
