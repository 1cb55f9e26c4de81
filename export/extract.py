"""Embedding extraction at scale: ``torchrun ... facefuse embed DIR_OR_LIST --model M --out EMB/``.

Each of the N processes embeds a disjoint contiguous part of the images (cut at whole batches, so a
rank's batches are the single-process run's batches and the rows are equal bit for bit) and writes
``EMB/embeddings-{rank:05d}-of-{N:05d}.npy``; after a barrier rank 0 writes, in global order,
``EMB/paths.txt`` and ``EMB/labels.txt`` (one line per row) and ``EMB/manifest.json``::

    {"format": "facefuse-embeddings", "version": 1, "dim": D, "count": N_rows, "dtype": "float32",
     "normalized": true, "settings": {EmbedSettings.to_dict()}, "world_size": N,
     "model": {"fingerprint": ..., "backbone": ..., "embedding_dim": D, "path": ...},
     "shards": [{"file": "embeddings-00000-of-00002.npy", "start": 0, "rows": R0}, ...]}

Rows are float32 and L2-normalised. Labels are the identity folder names (``DIR/<identity>/...``)
or, for a list file (one image path per line, relative to the list's folder, optionally followed by
a tab or space and the label), the label given or the image's folder name.
:func:`read_embed_folder` reads the folder back as ``(array, labels, paths)`` and
:func:`embed_folder_settings` the settings its rows were made with (manifests written before the
settings object kept ``flip_tta`` / ``detect`` loose; both are read).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from facefuse.core.errors import FacefuseError, ParameterError
from facefuse.core.settings import EmbedSettings, resolve_align
from facefuse.core.files import atomic_path, atomic_write_text
from facefuse.core.folders import scan_identity_folder
from facefuse.trainer import distributed

FORMAT, VERSION = "facefuse-embeddings", 1
MANIFEST = "manifest.json"


def shard_file(rank: int, world_size: int) -> str:
    return f"embeddings-{rank:05d}-of-{world_size:05d}.npy"


def list_images(source: str | Path) -> tuple[list[Path], list[str]]:
    """``(paths, labels)`` in the global order: a folder read as ``index build`` reads a gallery
    (:func:`core.folders.scan_identity_folder`), or a list file's lines in order."""
    source = Path(source)
    if source.is_dir():
        return scan_identity_folder(source)
    if not source.is_file():
        raise FacefuseError(f"{source}: no such folder or list file")
    paths, labels = [], []
    for line in source.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, _, label = line.strip().partition("\t") if "\t" in line else line.strip().partition(" ")
        p = Path(name) if Path(name).is_absolute() else source.parent / name
        paths.append(p)
        labels.append(label.strip() or p.parent.name)
    if not paths:
        raise FacefuseError(f"{source}: list file names no images")
    return paths, labels


def rank_rows(count: int, batch_size: int, world_size: int, rank: int) -> tuple[int, int]:
    """``[start, stop)`` rows of ``rank``: contiguous, cut at multiples of ``batch_size``."""
    batches = -(-count // batch_size)
    base, extra = divmod(batches, world_size)
    first = rank * base + min(rank, extra)
    last = first + base + (1 if rank < extra else 0)
    return min(count, first * batch_size), min(count, last * batch_size)


@dataclass
class Extraction:
    out: Path
    rank: int
    world_size: int
    rows: int        # this rank's
    count: int       # all ranks'
    dim: int


def extract_embeddings(source: str | Path, model: str | Path, out: str | Path,
                       settings: EmbedSettings = EmbedSettings()) -> Extraction:
    """Embed ``source`` (folder or list file) with ``model`` under ``settings`` into the folder ``out``
    (see the module docstring); under torchrun each process embeds its part. ``out`` must not hold
    embeddings yet. The manifest keeps ``settings``, so an index built from the folder embeds its
    later adds and searches alike."""
    from facefuse.export.runtime import load_embedder

    out = Path(out)
    if (out / MANIFEST).exists():
        raise ParameterError("out", out, f"already holds embeddings ({MANIFEST}); choose another folder")
    if out.exists() and not out.is_dir():
        raise ParameterError("out", out, "is a file, not a folder")
    paths, labels = list_images(source)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    info = distributed.init(device)
    try:
        if device == "cuda":
            device = f"cuda:{info.local_rank}"
        embedder = load_embedder(model, device=device)
        settings = settings.replace(align=resolve_align(settings.align, embedder.meta.alignment))
        lo, hi = rank_rows(len(paths), settings.batch_size, info.world_size, info.rank)
        emb, _ = embedder.embed_paths(paths[lo:hi], settings)
        out.mkdir(parents=True, exist_ok=True)
        with atomic_path(out / shard_file(info.rank, info.world_size)) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, emb.astype(np.float32, copy=False))
        distributed.barrier(info)
        if info.is_main:
            _write_manifest(out, paths, labels, info.world_size, settings, embedder, model)
        distributed.barrier(info)
    finally:
        distributed.shutdown(info)
    return Extraction(out, info.rank, info.world_size, hi - lo, len(paths), embedder.dim)


def _write_manifest(out: Path, paths, labels, world_size: int, settings: EmbedSettings, embedder, model) -> None:
    shards = []
    for r in range(world_size):
        start, stop = rank_rows(len(paths), settings.batch_size, world_size, r)
        shards.append({"file": shard_file(r, world_size), "start": start, "rows": stop - start})
    dim = _check_shards(out, shards, embedder.dim)
    atomic_write_text(out / "paths.txt", "".join(f"{p}\n" for p in paths))
    atomic_write_text(out / "labels.txt", "".join(f"{label}\n" for label in labels))
    manifest = {"format": FORMAT, "version": VERSION, "dim": dim, "count": len(paths), "dtype": "float32",
                "normalized": True, "settings": settings.to_dict(), "world_size": world_size,
                "model": {"fingerprint": embedder.fingerprint, "backbone": embedder.meta.backbone,
                          "embedding_dim": embedder.dim, "path": str(Path(model).resolve())},
                "shards": shards}
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1) + "\n")


def _check_shards(folder: Path, shards: list[dict], dim: int | None) -> int:
    """Every shard is a float32 ``rows x dim`` array, all of the same dim; returns dim."""
    for s in shards:
        path = folder / s["file"]
        if not path.is_file():
            raise FacefuseError(f"{path}: embedding shard missing")
        arr = np.load(path, mmap_mode="r")
        if arr.ndim != 2 or arr.shape[0] != s["rows"]:
            raise FacefuseError(f"{path}: expected {s['rows']} rows of embeddings, got shape {arr.shape}")
        if dim is None:
            dim = arr.shape[1]
        if arr.shape[1] != dim:
            raise FacefuseError(f"{path}: embeddings of dimension {arr.shape[1]}, but the other shards have {dim}")
    return dim


def embed_folder_settings(folder: str | Path) -> EmbedSettings:
    """The settings an ``embed`` folder's rows were made with."""
    return EmbedSettings.from_record(_manifest(Path(folder)))


def _manifest(folder: Path) -> dict:
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        raise ParameterError("embeddings", folder, f"no {MANIFEST} (not a `facefuse embed` folder)") from None
    except json.JSONDecodeError as exc:
        raise ParameterError("embeddings", folder, f"{MANIFEST} is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ParameterError("embeddings", folder, f"{MANIFEST} is not a facefuse embeddings manifest")
    return manifest


def read_embed_folder(folder: str | Path) -> tuple[np.ndarray, list[str], list[str]]:
    """``(N x D float32 array, labels, paths)`` of an ``embed`` output folder, in global order."""
    folder = Path(folder)
    manifest = _manifest(folder)
    _check_shards(folder, manifest["shards"], manifest["dim"])
    emb = np.concatenate([np.load(folder / s["file"]) for s in manifest["shards"]]).astype(np.float32, copy=False)
    labels = (folder / "labels.txt").read_text().splitlines()
    paths = (folder / "paths.txt").read_text().splitlines()
    if not len(emb) == len(labels) == len(paths) == manifest["count"]:
        raise ParameterError("embeddings", folder, f"{len(emb)} rows, {len(labels)} labels, {len(paths)} paths; "
                             f"the manifest says {manifest['count']}")
    return emb, labels, paths
