"""The contract of an embedding model, shared by every stage: the preprocessing (input size, mean,
std, channel order), the embedding size, a fingerprint of the weights (so an index refuses
queries embedded by another model) and, once calibrated, the decision thresholds with their
provenance. Stored in model files, checkpoints and ONNX metadata."""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field

import torch


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
    thresholds: dict = field(default_factory=dict)  # calibrated decision thresholds (verification.calibrate); {} if none
    alignment: str = ""  # how its training faces were framed: "template", "none", or "" (not recorded)

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
    def for_model(cls, cfg, model: torch.nn.Module, num_classes: int, mean, std, alignment: str = "") -> "ModelMeta":
        return cls(backbone=cfg.backbone, embedding_dim=cfg.embedding_dim, image_size=cfg.image_size,
                   mean=tuple(mean), std=tuple(std), fingerprint=fingerprint(model.state_dict()),
                   num_classes=num_classes, model=dataclasses.asdict(cfg), alignment=alignment)


def fingerprint(state_dict: dict) -> str:
    """sha256 of parameter names, shapes, dtypes and bytes: 16 hex digits."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().to("cpu").contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


