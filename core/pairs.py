"""Read verification pairs files into one :class:`Pairs` value.

Three formats are recognised from the first non-empty line:

``lfw`` (View 2, ``pairs.txt``)
    First line ``F<TAB>N``: ``F`` folds, each ``N`` same-person lines ``name i j`` followed by
    ``N`` different-person lines ``name1 i name2 j``. Pair ``k`` belongs to fold ``k // (2N)``.
``lfw-dev`` (View 1, ``pairsDevTrain.txt`` / ``pairsDevTest.txt``)
    First line ``N``: ``N`` same lines then ``N`` different lines; a single fold (fold 0).
``plain``
    Lines ``path_a path_b [label]``, the fields separated by a tab, a comma or spaces (a line with
    a tab is split on tabs, else one with a comma on commas, else on runs of spaces, so tab- and
    comma-separated files may hold paths with spaces). The label is ``1``/``0``, ``same``/
    ``different`` (also ``true``/``false``): either every line has one or none does. Blank lines
    and lines starting with ``#`` are skipped. No folds.

LFW image paths are ``<root>/<name>/<name>_<i:04d><ext>``; plain relative paths are resolved
against ``root``. Without a root, the pairs file's own folder is used (LFW files: its ``lfw-112`` sub-folder when present).

Every malformed line raises :class:`FacefuseError` naming the file and the line number.
"""

from __future__ import annotations

import re
from array import array
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import FacefuseError

_LABELS = {"1": 1, "0": 0, "same": 1, "different": 0, "diff": 0, "true": 1, "false": 0}


@dataclass
class Pairs:
    """Parsed pairs: pair ``k`` compares ``images[ia[k]]`` with ``images[ib[k]]``.

    Only the distinct images are Python objects; everything per pair is a numpy array, so a file of
    10^6 pairs over 10^5 images costs memory in proportion to the images (plus 8 bytes per pair and
    array). ``labels`` (int8, 1 = same person) and ``folds`` (int64 fold index) are ``None`` when
    the file has none. ``lines`` holds the 1-based line number of every pair in ``source``.
    """

    source: Path
    format: str
    images: list[Path]      # every distinct image once, in first-seen order
    ia: np.ndarray          # int64 index into images, per pair
    ib: np.ndarray
    labels: np.ndarray | None
    folds: np.ndarray | None
    lines: np.ndarray

    def __len__(self) -> int:
        return int(self.ia.size)

    @property
    def paths_a(self) -> list[Path]:
        """First image of every pair (a new list: one object per pair; avoid on large files)."""
        return [self.images[i] for i in self.ia.tolist()]

    @property
    def paths_b(self) -> list[Path]:
        return [self.images[i] for i in self.ib.tolist()]

    def unique_paths(self) -> tuple[list[Path], np.ndarray, np.ndarray]:
        """Every distinct image once, in first-seen order, and each pair's two indices into it."""
        return self.images, self.ia, self.ib

    def first_lines(self) -> dict[Path, int]:
        """The first line on which each image appears (for error messages)."""
        first = np.full(len(self.images), np.iinfo(np.int64).max, dtype=np.int64)
        np.minimum.at(first, self.ia, self.lines)
        np.minimum.at(first, self.ib, self.lines)
        return dict(zip(self.images, first.tolist()))


class _Interner:
    """Distinct images by the text that names them: one Path per distinct image, an int per use."""

    def __init__(self):
        self.by_key: dict[str, int] = {}
        self.by_path: dict[Path, int] = {}
        self.images: list[Path] = []

    def __call__(self, key: str, make_path) -> int:
        i = self.by_key.get(key)
        if i is None:
            p = make_path()
            i = self.by_path.setdefault(p, len(self.images))
            if i == len(self.images):
                self.images.append(p)
            self.by_key[key] = i
        return i


def _rows(path: Path):
    """``(line number, stripped text)`` of every non-empty, non-comment line, read as a stream."""
    try:
        with open(path, encoding="utf-8-sig") as f:  # a byte-order mark is not part of the first path
            for n, line in enumerate(f, start=1):
                s = line.strip()
                if s and not s.startswith("#"):
                    yield n, s
    except FileNotFoundError:
        raise FacefuseError(f"{path}: pairs file not found") from None
    except IsADirectoryError:
        raise FacefuseError(f"{path}: is a folder, expected a pairs file") from None
    except UnicodeDecodeError:
        raise FacefuseError(f"{path}: not a text file") from None


def read_pairs(path: str | Path, root: str | Path | None = None, ext: str = ".jpg") -> Pairs:
    """Parse a pairs file of any supported format (see the module docstring)."""
    path = Path(path)
    base = Path(root) if root is not None else path.parent
    rows = _rows(path)
    first = next(rows, None)
    if first is None:
        raise FacefuseError(f"{path}: no pairs in the file")
    head = first[1].split()
    if len(head) in (1, 2) and all(f.isdigit() for f in head):
        folds, per_side = (1, int(head[0])) if len(head) == 1 else (int(head[0]), int(head[1]))
        fmt = "lfw-dev" if len(head) == 1 else "lfw"
        if root is None and (path.parent / "lfw-112").is_dir():
            base = path.parent / "lfw-112"  # the aligned LFW images beside the official pairs files
        return _read_lfw(path, fmt, rows, folds, per_side, base, ext)
    return _read_plain(path, _chain(first, rows), base)


def _chain(first, rest):
    yield first
    yield from rest


def _where(path: Path, line: int) -> str:
    return f"{path.name}:{line}"


def _lfw_index(path: Path, line: int, field: str) -> int:
    if not field.isdigit() or int(field) < 1:
        raise FacefuseError(f"{_where(path, line)}: image number {field!r} is not a positive integer")
    return int(field)


def _read_lfw(path, fmt, rows, n_folds, per_side, base, ext) -> Pairs:
    expected = 2 * n_folds * per_side
    if n_folds < 1 or per_side < 1:
        raise FacefuseError(f"{_where(path, 1)}: header needs positive counts, got {n_folds} x {per_side}")
    intern = _Interner()

    def img(name, i):
        return intern(f"{name}\t{i}", lambda: base / name / f"{name}_{i:04d}{ext}")

    ia, ib, lines = array("q"), array("q"), array("q")
    k = 0
    for n, s in rows:
        if k >= expected:
            k += 1  # too many lines: only counted, for the error below
            continue
        f = s.split()
        if len(f) not in (3, 4):
            raise FacefuseError(f"{_where(path, n)}: expected 3 or 4 fields, got {len(f)}")
        same = (k % (2 * per_side)) < per_side
        if same != (len(f) == 3):
            kind = "same-person `name i j` (3" if same else "different-person `name1 i name2 j` (4"
            raise FacefuseError(f"{_where(path, n)}: expected a {kind} fields) line here, got {len(f)} fields")
        if same:
            a, b = img(f[0], _lfw_index(path, n, f[1])), img(f[0], _lfw_index(path, n, f[2]))
        else:
            a, b = img(f[0], _lfw_index(path, n, f[1])), img(f[2], _lfw_index(path, n, f[3]))
        ia.append(a)
        ib.append(b)
        lines.append(n)
        k += 1
    if k != expected:
        raise FacefuseError(
            f"{path.name}: header says {n_folds} fold(s) x 2 x {per_side} = {expected} pairs, "
            f"found {k} lines")
    pos = np.arange(expected, dtype=np.int64)
    labels = ((pos % (2 * per_side)) < per_side).astype(np.int8)
    return Pairs(path, fmt, intern.images, np.frombuffer(ia, dtype=np.int64).copy(),
                 np.frombuffer(ib, dtype=np.int64).copy(), labels, pos // (2 * per_side),
                 np.frombuffer(lines, dtype=np.int64).copy())


def _split(line: str) -> list[str]:
    if "\t" in line:
        return [f.strip() for f in line.split("\t")]
    if "," in line:
        return [f.strip() for f in line.split(",")]
    return re.split(r" +", line)


def _read_plain(path, rows, base) -> Pairs:
    intern = _Interner()
    ia, ib, labels, lines = array("q"), array("q"), array("b"), array("q")
    has_label = None
    for n, s in rows:
        f = _split(s)
        if len(f) not in (2, 3) or not all(f):
            got = f"{len(f)}" if all(f) else "an empty field"
            raise FacefuseError(f"{_where(path, n)}: expected `path_a path_b [label]` (2 or 3 fields), got {got}")
        if has_label is None:
            has_label, first = len(f) == 3, n
        elif has_label != (len(f) == 3):
            raise FacefuseError(
                f"{_where(path, n)}: {'no' if has_label else 'a'} label here but line {first} "
                f"{'has one' if has_label else 'has none'}; label every line or none")
        if has_label:
            lab = _LABELS.get(f[2].lower())
            if lab is None:
                raise FacefuseError(f"{_where(path, n)}: label {f[2]!r} is not 1/0 or same/different")
            labels.append(lab)
        ia.append(intern(f[0], lambda: base / Path(f[0]).expanduser()))
        ib.append(intern(f[1], lambda: base / Path(f[1]).expanduser()))
        lines.append(n)
    as_np = lambda a, t: np.frombuffer(a, dtype=t).copy()  # noqa: E731
    return Pairs(path, "plain", intern.images, as_np(ia, np.int64), as_np(ib, np.int64),
                 as_np(labels, np.int8) if has_label else None, None, as_np(lines, np.int64))
