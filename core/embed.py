"""Batch embedding of image files, one implementation for every stage: training validation,
export checks, ``verify``, ``index build/add`` and ``search`` all call :func:`embed_paths`.

The caller supplies ``embed_batch``: a function from a preprocessed float32 batch
(B x 3 x S x S) to raw embeddings (B x D, numpy or torch). Flip test-time augmentation is
``e(x) + e(mirror(x))``; returned rows are L2-normalised float32, so cosine similarity is a dot
product.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .errors import BadImageError, FacefuseError
from .images import open_rgb
from .settings import EmbedSettings
from .vectors import l2_normalize  # noqa: F401  (part of this module's API)

MAX_LISTED = 5  # bad images named in one error message
IN_PROCESS_BELOW = 64  # fewer images are decoded in-process: starting workers would cost more


def embed_batch_tta(embed_batch: Callable, x: torch.Tensor, flip: bool) -> np.ndarray:
    """Raw float32 embeddings of a batch, with ``e(x) + e(mirror(x))`` when ``flip``."""
    e = _numpy(embed_batch(x))
    if flip:
        e = e + _numpy(embed_batch(x.flip(-1)))
    return e


def embed_paths(embed_batch: Callable, paths, transform, *, dim: int, settings: EmbedSettings = EmbedSettings(),
                where: dict | None = None, progress: Callable[[int], object] | None = None,
                found: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Embed image files; decoding runs in ``settings.workers`` DataLoader workers, ``settings.batch_size``
    images at a time, with ``settings.flip`` test-time augmentation (``transform`` already holds the
    model's preprocessing and any face alignment).

    Returns ``(embeddings N x dim float32 L2-normalised, ok N bool)``; rows of failed images are zero.
    A missing or undecodable image raises :class:`FacefuseError` listing the first few (with
    ``where[path]``, e.g. ``"pairs.txt:17"``, when given) unless ``settings.skip_missing``. Missing
    files are found before any decoding starts, so that error comes at once. ``progress(n)`` is called
    after each batch with the number of images it embedded (e.g. a tqdm bar's ``update``).

    ``transform`` may return ``(tensor, faces)`` instead of a tensor (a face-finding step saying how
    many faces it saw); with ``found`` given, ``found[i]`` is then that count for image ``i``.
    """
    skip_missing = settings.skip_missing
    paths = [Path(p) for p in paths]
    errors = {i: f"{p}: {'is a folder, not an image' if p.is_dir() else 'no such file'}"
              for i, p in enumerate(paths) if not p.is_file()}
    if errors and not skip_missing:
        raise FacefuseError(_listing(errors, paths, where, "missing"))
    todo = [i for i in range(len(paths)) if i not in errors]
    rows: list[np.ndarray] = []
    done: list[int] = []
    if todo:
        loader = DataLoader(_Images([paths[i] for i in todo], transform), batch_size=settings.batch_size,
                            num_workers=_workers(settings.workers, len(todo)), collate_fn=_collate)
        for idx, x, bad, counts in loader:
            if found is not None:
                found.update((todo[j], n) for j, n in zip(idx, counts) if n is not None)
            errors.update((todo[j], msg) for j, msg in bad)
            if errors and not skip_missing:
                break  # fail early: no point embedding the rest
            if x is not None:
                rows.append(l2_normalize(embed_batch_tta(embed_batch, x, settings.flip)))
                done += [todo[j] for j in idx]
                if progress is not None:
                    progress(len(idx))
    if errors and not skip_missing:
        raise FacefuseError(_listing(errors, paths, where, "unreadable"))
    out = np.zeros((len(paths), dim), dtype=np.float32)
    if rows:
        out[done] = np.concatenate(rows)
    ok = np.ones(len(paths), dtype=bool)
    ok[list(errors)] = False
    return out, ok


def _numpy(e) -> np.ndarray:
    if isinstance(e, torch.Tensor):
        e = e.detach().float().cpu().numpy()
    return np.asarray(e, dtype=np.float32)


def _workers(workers: int | None, n: int) -> int:
    if workers is None:
        workers = min(4, os.cpu_count() or 1)
    return 0 if n < IN_PROCESS_BELOW else workers


def _listing(errors: dict, paths, where, kind: str) -> str:
    first = sorted(errors)[:MAX_LISTED]
    items = [errors[i] + (f" ({(where or {}).get(paths[i])})" if (where or {}).get(paths[i]) else "") for i in first]
    more = f" and {len(errors) - len(first)} more" if len(errors) > len(first) else ""
    return (f"{len(errors)} {kind} image(s): " + "; ".join(items) + more
            + " (skip_missing=True goes on without them)")


class _Images(Dataset):
    """(index, tensor or None, error message or None, faces found or None) per path: a bad image
    never stops a worker."""

    def __init__(self, paths: list[Path], transform):
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            out = self.transform(open_rgb(self.paths[i]))
        except BadImageError as exc:
            return i, None, str(exc), None
        x, faces = out if isinstance(out, tuple) else (out, None)
        return i, x, None, faces


def _collate(items):
    good = [(i, x, n) for i, x, err, n in items if err is None]
    bad = [(i, err) for i, _, err, _ in items if err is not None]
    x = torch.stack([x for _, x, _ in good]) if good else None
    return [i for i, _, _ in good], x, bad, [n for _, _, n in good]
