"""Checkpoints: written atomically, read with ``torch.load(weights_only=True)`` (tensors and plain
Python values only; nothing arbitrary is ever unpickled).

A run folder holds ``config.yaml``, ``checkpoints/last.pt`` (full training state for ``--resume``),
``model.pt`` (inference file: embedder weights, EMA when enabled, plus :class:`ModelMeta`),
``metrics.jsonl`` and ``summary.json``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import pickle
import random
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from facefuse.trainer.config import ModelConfig
from facefuse.core.errors import FacefuseError
from facefuse.core.files import atomic_path

FORMAT = "facefuse"
VERSION = 1


@dataclass
class ModelMeta:
    """The preprocessing and identity contract of an embedding model."""

    backbone: str
    embedding_dim: int
    image_size: int
    mean: tuple = (0.5, 0.5, 0.5)
    std: tuple = (0.5, 0.5, 0.5)
    channel_order: str = "RGB"
    fingerprint: str = ""
    num_classes: int = 0
    model: dict = field(default_factory=dict)  # the full ModelConfig, to rebuild the network

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelMeta":
        names = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in names}
        d["mean"], d["std"] = tuple(d.get("mean", cls.mean)), tuple(d.get("std", cls.std))
        return cls(**d)

    @classmethod
    def for_model(cls, cfg: ModelConfig, model: torch.nn.Module, num_classes: int, mean, std) -> "ModelMeta":
        return cls(backbone=cfg.backbone, embedding_dim=cfg.embedding_dim, image_size=cfg.image_size,
                   mean=tuple(mean), std=tuple(std), fingerprint=fingerprint(model.state_dict()),
                   num_classes=num_classes, model=dataclasses.asdict(cfg))


def fingerprint(state_dict: dict) -> str:
    """sha256 of parameter names, shapes, dtypes and bytes: 16 hex digits."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().to("cpu").contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def save(path: str | Path, payload: dict) -> None:
    """Atomic ``torch.save``: an interrupted write never replaces a good checkpoint."""
    payload = {"format": FORMAT, "version": VERSION, **payload}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


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
    cfg = ModelConfig(**{**meta.model, "kernel_backend": "torch"})
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
