"""Embedding model (backbone + neck, ``embed(x)`` in one call) and the training wrapper that adds
dropout, the classification head and an optional pair loss."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from facefuse.trainer.backbones import build_backbone
from facefuse.trainer.config import LossConfig, ModelConfig
from facefuse.core.registry import Registry
from facefuse.trainer.distributed import gather_labels, gather_rows
from facefuse.trainer.ops import check_backend, resolve_backend

NECKS = Registry("neck")


@NECKS.register("gdc")
class GDCNeck(nn.Module):
    """Global depthwise conv (MobileFaceNet): a learned per-channel spatial weighting of the final
    map instead of average pooling, then a linear projection and BatchNorm."""

    def __init__(self, channels: int, spatial: tuple[int, int], dim: int):
        super().__init__()
        self.dw = nn.Conv2d(channels, channels, spatial, groups=channels, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.fc = nn.Linear(channels, dim, bias=False)
        self.bn2 = nn.BatchNorm1d(dim)

    def forward(self, f):
        return self.bn2(self.fc(self.bn1(self.dw(f)).flatten(1)))


@NECKS.register("flatten")
class FlattenNeck(nn.Module):
    """ArcFace's output layer "E": BN -> flatten -> FC -> BN over the whole final map."""

    def __init__(self, channels: int, spatial: tuple[int, int], dim: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(channels)
        self.fc = nn.Linear(channels * spatial[0] * spatial[1], dim, bias=False)
        self.bn2 = nn.BatchNorm1d(dim)

    def forward(self, f):
        return self.bn2(self.fc(self.bn1(f).flatten(1)))


@NECKS.register("gap")
class GAPNeck(nn.Module):
    """Global average pooling -> FC -> BN."""

    def __init__(self, channels: int, spatial: tuple[int, int], dim: int):
        super().__init__()
        self.fc = nn.Linear(channels, dim, bias=False)
        self.bn = nn.BatchNorm1d(dim)

    def forward(self, f):
        return self.bn(self.fc(f.mean((2, 3))))




class EmbeddingModel(nn.Module):
    """Image batch (B x 3 x S x S, normalised) -> B x D embedding (not L2-normalised)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        make_neck = NECKS.get(cfg.neck)
        backend = resolve_backend(cfg.kernels)
        self.backbone = build_backbone(cfg.backbone, width=cfg.width, drop_path=cfg.drop_path,
                                       kernel_backend=backend)
        side = _output_side(cfg.image_size, self.backbone)
        self.neck = make_neck(self.backbone.num_features, (side, side), cfg.embedding_dim)
        self.embedding_dim = cfg.embedding_dim
        self.image_size = cfg.image_size

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.neck(self.forward_features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(x)

    def set_kernel_backend(self, backend: str) -> None:
        self.backbone.set_kernel_backend(check_backend(backend))


def _output_side(image_size: int, backbone: nn.Module) -> int:
    """Side of the final feature map, found by one tiny forward (robust to any stem/stride)."""
    was_training = backbone.training
    backbone.eval()
    with torch.no_grad():
        side = backbone(torch.zeros(1, 3, image_size, image_size)).shape[-1]
    backbone.train(was_training)
    return side


@dataclass
class StepOutput:
    loss: torch.Tensor
    preds: torch.Tensor | None
    embeddings: torch.Tensor


class FaceModel(nn.Module):
    """What is trained: embedder, dropout, classification head and/or pair loss.

    ``forward(x, labels)`` returns the combined loss; with MixUp/CutMix pass ``labels_b`` and ``lam``
    and the classification loss becomes ``lam * L(y_a) + (1 - lam) * L(y_b)`` (each with its own
    margin). Pair losses always see the first labels."""

    def __init__(self, embedder: EmbeddingModel, head: nn.Module | None, pair_loss: nn.Module | None,
                 *, dropout: float = 0.0, pair_weight: float = 1.0):
        super().__init__()
        if head is None and pair_loss is None:
            raise ValueError("a model needs a classification head, a pair loss, or both")
        self.embedder = embedder
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.head = head
        self.pair_loss = pair_loss
        self.pair_weight = pair_weight
        self.cross_rank_pairs = False  # torchrun: the pair loss sees every rank's embeddings (set by the trainer)

    def forward(self, x, labels, labels_b=None, lam: float = 1.0) -> StepOutput:
        emb = self.embedder.embed(x)
        loss = emb.new_zeros((), dtype=torch.float32)
        preds = None
        if self.head is not None:
            h = self.dropout(emb)
            out = self.head(h, labels)
            loss = loss + (lam * out.loss if labels_b is not None else out.loss)
            preds = out.preds
            if labels_b is not None and lam < 1:
                loss = loss + (1 - lam) * self.head(h, labels_b).loss
        if self.pair_loss is not None and (self.head is None or self.pair_weight > 0):
            w = 1.0 if self.head is None else self.pair_weight
            pair_emb, pair_labels = emb.float(), labels
            if self.cross_rank_pairs:  # identical global-batch loss on every rank; see gather_rows
                pair_emb, pair_labels = gather_rows(pair_emb), gather_labels(labels)
            loss = loss + w * self.pair_loss(pair_emb, pair_labels)
        return StepOutput(loss, preds, emb)

    def set_kernel_backend(self, backend: str) -> None:
        self.embedder.set_kernel_backend(backend)
        if self.head is not None and hasattr(self.head, "kernel_backend"):
            self.head.kernel_backend = backend


def build_model(cfg: ModelConfig, num_classes: int) -> EmbeddingModel:
    """The embedding model alone (what is exported and served). ``num_classes`` is unused here
    and kept so callers build models and heads from the same arguments."""
    del num_classes
    return EmbeddingModel(cfg)


def build_face_model(model_cfg: ModelConfig, loss_cfg: LossConfig, num_classes: int, *, seed: int = 0) -> FaceModel:
    """The embedding model with its training head and/or pair loss, as the config names them.
    With ``loss_cfg.head_parallel`` the head is this process's shard (:mod:`trainer.sharded_head`),
    its centres initialised from ``seed``."""
    from facefuse.trainer.losses import HEADS, PAIR_LOSSES, build_head, build_pair_loss
    from facefuse.trainer.sharded_head import ShardedMarginHead

    embedder = build_model(model_cfg, num_classes)
    backend = resolve_backend(model_cfg.kernels)
    name = loss_cfg.name
    if name not in HEADS and name not in PAIR_LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid: {', '.join(HEADS.names() + PAIR_LOSSES.names())}")
    head = None
    if name in HEADS:
        options = dict(s=loss_cfg.scale, margin=loss_cfg.margin, m1=loss_cfg.m1, m2=loss_cfg.m2, m3=loss_cfg.m3,
                       easy_margin=loss_cfg.easy_margin, label_smoothing=loss_cfg.label_smoothing,
                       kernel_backend=backend)
        if loss_cfg.head_parallel:
            head = ShardedMarginHead.from_options(name, model_cfg.embedding_dim, num_classes,
                                                  sample_rate=loss_cfg.sample_rate, seed=seed, **options)
        else:
            head = build_head(name, model_cfg.embedding_dim, num_classes, **options, **loss_cfg.head_options)
    pair_name = loss_cfg.pair_loss if name in HEADS else name
    pair = None
    if pair_name:
        pair = build_pair_loss(pair_name, model_cfg.embedding_dim, num_classes, **loss_cfg.pair_options)
    return FaceModel(embedder, head, pair, dropout=model_cfg.dropout, pair_weight=loss_cfg.pair_weight)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


