"""Folders of face images, without decoding anything (no numpy, no torch): which files are images,
and how a folder of identities is read (one sub-folder per identity, or images named
``<identity>_<anything>``). Training data, galleries, calibration and ``embed`` read folders this way."""

from __future__ import annotations

from pathlib import Path

from .errors import FacefuseError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".pgm", ".ppm", ".pbm", ".gif", ".bmp", ".tif", ".tiff", ".webp"}
IGNORED_NAMES = {"Thumbs.db", "desktop.ini"}


def is_image(path: Path) -> bool:
    """An existing file with an image extension (hidden files are not images)."""
    path = Path(path)
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def images_under(folder: str | Path) -> list[Path]:
    """Every image file under ``folder``, at any depth, in sorted path order."""
    return [p for p in sorted(Path(folder).rglob("*")) if is_image(p)]


def identity_from_name(path: Path) -> str:
    """``<identity>_<anything>.ext`` -> identity, split at the last underscore (so LFW's
    ``George_W_Bush_0001.jpg`` is ``George_W_Bush``); a name without ``_`` is its own identity."""
    stem = path.stem
    return stem.rsplit("_", 1)[0] if "_" in stem else stem


def scan_identity_folder(folder: str | Path) -> tuple[list[Path], list[str]]:
    """Images and identities of a gallery folder: each sub-folder is one identity (its images, at
    any depth, belong to it); images directly in ``folder`` are named ``<identity>_<anything>``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FacefuseError(f"{folder}: no such gallery folder")
    paths, ids = [], []
    for entry in sorted(folder.iterdir()):
        if entry.is_dir() and not entry.name.startswith("."):
            found = images_under(entry)
            paths += found
            ids += [entry.name] * len(found)
        elif is_image(entry):
            paths.append(entry)
            ids.append(identity_from_name(entry))
    if not paths:
        raise FacefuseError(f"{folder}: the gallery is empty (no images; expected one folder per identity "
                            "or images named <identity>_<anything>.jpg)")
    return paths, ids
