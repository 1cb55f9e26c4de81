"""Checkpoints: written atomically, read with ``torch.load(weights_only=True)`` (tensors and plain
Python values only; nothing arbitrary is ever unpickled).

A run folder holds ``config.yaml``, ``checkpoints/last.pt`` (full training state for ``--resume``),
``model.pt`` (inference file: embedder weights, EMA when enabled, plus :class:`ModelMeta`),
``metrics.jsonl`` and ``summary.json``.

With a sharded head (``--head-parallel``) ``last.pt`` holds the replicated state and records
``head_parallel = {world_size, step, num_classes}``; each rank r of N writes its class shard of the
centres, their optimiser and EMA state and its RNG to ``checkpoints/head-rank{r}-of-{N}-step{S}.pt``
first, then rank 0 writes ``last.pt`` naming step S, then the shards of older steps are removed: an
interruption at any point leaves a ``last.pt`` whose shard files are all there.
"""

from __future__ import annotations

import dataclasses
import pickle
import random
import struct
import zipfile
from pathlib import Path

import numpy as np
import torch

from facefuse.core.errors import FacefuseError
from facefuse.core.files import atomic_path
from facefuse.core.meta import ModelMeta, fingerprint  # noqa: F401  (ModelMeta: part of this module's API)
from facefuse.trainer.config import ModelConfig

FORMAT = "facefuse"
VERSION = 1


def save(path: str | Path, payload: dict) -> None:
    """Atomic ``torch.save``: an interrupted write never replaces a good checkpoint."""
    payload = {"format": FORMAT, "version": VERSION, **payload}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def head_shard_path(folder: str | Path, rank: int, world_size: int, step: int) -> Path:
    """Rank ``rank``'s head shard of the checkpoint at ``step`` (see the module docstring)."""
    return Path(folder) / f"head-rank{rank}-of-{world_size}-step{step:09d}.pt"


def remove_stale_head_shards(folder: str | Path, rank: int, world_size: int, keep_step: int) -> None:
    """Delete this rank's shard files of steps other than ``keep_step`` (after last.pt names it)."""
    keep = head_shard_path(folder, rank, world_size, keep_step)
    for p in Path(folder).glob(f"head-rank{rank}-of-{world_size}-step*.pt"):
        if p != keep:
            p.unlink(missing_ok=True)


def load(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FacefuseError(f"{path}: no such checkpoint file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, ValueError, struct.error, KeyError,
            IndexError, AttributeError, TypeError, UnicodeDecodeError) as exc:  # what torch.load raises on junk
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FacefuseError(f"{path}: not a facefuse checkpoint ({first[:160]})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise FacefuseError(f"{path}: not a facefuse checkpoint (no facefuse header)")
    return payload


def save_model_file(path: str | Path, model: torch.nn.Module, meta: ModelMeta) -> None:
    """Inference file: embedder weights and the meta needed to rebuild and feed it."""
    state = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    meta = dataclasses.replace(meta, fingerprint=fingerprint(state))
    save(path, {"kind": "model", "meta": meta.to_dict(), "embedder": state})


def set_thresholds(path: str | Path, thresholds: dict) -> Path:
    """Store calibrated decision thresholds in the metadata of a model file, training checkpoint or
    run folder (its ``model.pt``, else ``checkpoints/last.pt``), rewriting that file atomically.
    The weights are untouched. Returns the file written."""
    path = resolve_model_path(path)
    payload = load(path)
    if not isinstance(payload.get("meta"), dict):
        raise FacefuseError(f"{path}: checkpoint has no model metadata to store thresholds in")
    payload["meta"] = {**payload["meta"], "thresholds": thresholds}
    save(path, payload)
    return path


def resolve_model_path(path: str | Path) -> Path:
    """A run folder resolves to its ``model.pt`` (else ``checkpoints/last.pt``)."""
    path = Path(path)
    if path.is_dir():
        for candidate in (path / "model.pt", path / "checkpoints" / "last.pt"):
            if candidate.is_file():
                return candidate
        raise FacefuseError(f"{path}: run folder has no model.pt or checkpoints/last.pt")
    return path


def load_embedding_model(path: str | Path, device: str | torch.device = "cpu", *, ema: bool = True):
    """Rebuild the embedding model from a model file, training checkpoint or run folder.

    Returns ``(model in eval mode on device, ModelMeta)``. Training checkpoints use their EMA
    weights when present and ``ema`` is true."""
    from facefuse.trainer.model import build_model

    path = resolve_model_path(path)
    payload = load(path)
    meta = ModelMeta.from_dict(payload["meta"])
    if payload.get("kind") == "model":
        state = payload["embedder"]
    else:
        state = payload.get("ema") if ema and payload.get("ema") else _embedder_state(payload["model"])
    saved = {k: v for k, v in meta.model.items() if k != "kernel_backend"}  # key of earlier releases
    cfg = ModelConfig(**{**saved, "kernels": "torch"})
    model = build_model(cfg, meta.num_classes)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise FacefuseError(f"{path}: weights do not match the {meta.backbone} architecture "
                            f"({str(exc).splitlines()[0][:160]})") from None
    meta = dataclasses.replace(meta, fingerprint=fingerprint(model.state_dict()))
    return model.to(device).eval(), meta


def _embedder_state(face_model_state: dict) -> dict:
    prefix = "embedder."
    return {k[len(prefix):]: v for k, v in face_model_state.items() if k.startswith(prefix)}


# ---------------------------------------------------------------- RNG state (for exact resume)

def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
