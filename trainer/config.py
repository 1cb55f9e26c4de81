"""Training configuration: dataclass defaults, overridden by a config file, overridden by options.

The resolved config is written to ``RUN_DIR/config.yaml`` so that a run can be reproduced with
``facefuse train --config RUN_DIR/config.yaml``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from facefuse.core.errors import FacefuseError


# The default recipe: what `facefuse train --data D --out O` trains. It was chosen by measurement
# (benchmarks/README.md: LFW fold 0, identity-disjoint, this project's 2-core CPU) and equals the
# config of this row of benchmarks/results/lfw_protocol-cpu2.json (tests/test_benchmarks_lfw.py).
# It is a small-data, CPU-budget recipe; with a GPU and a large set, raise --width and --image-size.
DEFAULT_RECIPE_ROW = "recipe/convnext-sphereface"


@dataclass
class DataConfig:
    root: str = ""                      # one sub-folder per identity
    exclude_identities: str | None = None  # file, one identity name per line
    min_images: int = 2                 # identities with fewer images are dropped
    val_fraction: float = 0.03          # held-out images per identity (identities with >= 2 images)
    val_pairs: str | None = None        # LFW pairs.txt or `path_a path_b label` lines
    val_pairs_root: str | None = None   # images of the pairs file (default: beside it / lfw-112)
    val_pairs_fold: int | None = None   # evaluate only this fold of an LFW pairs file
    val_pairs_disjoint: bool = False    # leave the val pairs' identities out of training
    skip_bad: bool = False              # skip corrupt images with a count instead of failing
    verify_images: bool = True          # decode every image once before training
    num_workers: int = 2
    sampler: str = "random"             # random | pk
    pk_identities: int = 32             # P identities per batch (sampler=pk)
    pk_images: int = 4                  # K images per identity (sampler=pk)
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)


@dataclass
class AugmentConfig:
    hflip: float = 0.5                  # probability
    vflip: float = 0.0
    crop_scale: float = 1.0             # RandomResizedCrop scale lower bound (1.0 = off)
    color_jitter: float = 0.0           # brightness/contrast/saturation strength (0 = off)
    perspective: float = 0.0            # RandomPerspective distortion scale (0 = off)
    randaugment: int = 0                # RandAugment magnitude (0 = off)
    random_erasing: float = 0.0         # probability
    mixup: float = 0.0                  # MixUp alpha (0 = off)
    cutmix: float = 0.0                 # CutMix alpha (0 = off)
    pipeline: list | None = None        # explicit v2 pipeline: [[name, {kwargs}], ...] replaces the above


@dataclass
class ModelConfig:
    backbone: str = "convnext_atto"
    embedding_dim: int = 256
    image_size: int = 64
    dropout: float = 0.0                # before the classifier
    width: float = 0.5                  # channel multiplier
    drop_path: float = 0.0              # stochastic depth (residual blocks)
    neck: str = "gdc"                   # gdc | flatten | gap: feature map -> embedding
    kernel_backend: str = "torch"       # torch | triton (resolved from the device when "auto")


@dataclass
class LossConfig:
    name: str = "sphereface"            # classification head or pair-only loss
    s: float = 32.0
    margin: float | None = None         # head default when None
    m1: float = 1.0                     # combined margin only
    m2: float = 0.0
    m3: float = 0.0
    label_smoothing: float = 0.0
    pair: str | None = None             # joint pair loss: triplet | center | npair | circle | supcon
    pair_weight: float = 1.0            # lambda in  cls + lambda * pair
    pair_margin: float | None = None    # triplet margin / circle m (loss default when None)
    mining: str = "batch_hard"          # triplet: batch_hard | semi_hard | all
    temperature: float = 0.1            # supcon
    center_lr: float | None = None      # center-loss centers: None = the model's lr and schedule


@dataclass
class OptimConfig:
    optimizer: str = "adamw"            # adamw | sgd
    lr: float = 3e-3
    weight_decay: float = 0.05
    momentum: float = 0.9
    epochs: int = 20                    # default recipe: 30 min on half of this project's 2-core CPU
    batch_size: int = 128
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.01          # cosine decays to lr * min_lr_ratio
    grad_clip: float = 5.0              # max global grad norm (0 = off)
    amp: str = "auto"                   # auto | none | bf16 | fp16 (auto: bf16 on CUDA, none on CPU)
    ema_decay: float = 0.0              # 0 = off
    channels_last: bool = True          # on CUDA


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    out: str = ""
    device: str = "auto"                # auto | cpu | cuda
    seed: int = 0
    init_from: str | None = None        # sequential fine-tuning: start from this checkpoint's weights
    time_budget: float = 0.0            # minutes; stop cleanly when spent (0 = none)
    checkpoint_minutes: float = 5.0     # also checkpoint this often within an epoch
    eval_every: int = 1                 # epochs
    threads: int = 0                    # torch CPU threads (0 = torch default)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _merge(obj, values: dict, where: str):
    """Recursively apply ``values`` onto dataclass ``obj``; unknown keys are an error naming them."""
    fields = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in values.items():
        if key not in fields:
            raise FacefuseError(f"{where}: unknown key {key!r}; valid: {', '.join(fields)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise FacefuseError(f"{where}: {key!r} must be a mapping")
            _merge(current, value, f"{where}.{key}" if "." in where else f"{where}: {key}")
        else:
            if isinstance(current, tuple) and isinstance(value, list):
                value = tuple(value)
            setattr(obj, key, value)
    return obj


def load_config_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FacefuseError(f"--config {path}: no such file")
    try:
        text = path.read_text()
        values = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FacefuseError(f"--config {path}: not valid YAML/JSON ({str(exc).splitlines()[0]})") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise FacefuseError(f"--config {path}: expected a mapping at the top level")
    return values


def set_dotted(values: dict, dotted: str, value: Any) -> None:
    """``set_dotted(d, "optim.lr", 0.1)`` sets ``d["optim"]["lr"]``."""
    *parents, leaf = dotted.split(".")
    for p in parents:
        values = values.setdefault(p, {})
    values[leaf] = value


def resolve_config(config_file: str | Path | None = None, overrides: dict | None = None) -> TrainConfig:
    """Defaults <- config file <- ``overrides`` (a dict of dotted keys); then validated."""
    cfg = TrainConfig()
    if config_file:
        _merge(cfg, load_config_file(config_file), f"--config {config_file}")
    nested: dict = {}
    for key, value in (overrides or {}).items():
        if value is not None:
            set_dotted(nested, key, value)
    _merge(cfg, nested, "option")
    validate(cfg)
    return cfg


def _check(cond: bool, option: str, msg: str) -> None:
    if not cond:
        raise FacefuseError(f"{option}: {msg}")


def validate(cfg: TrainConfig) -> None:
    """Range checks; each error names the option."""
    o, d, m, l, a = cfg.optim, cfg.data, cfg.model, cfg.loss, cfg.augment
    _check(o.epochs >= 1, "--epochs", f"must be >= 1, got {o.epochs}")
    _check(o.batch_size >= 2, "--batch-size", f"must be >= 2, got {o.batch_size}")
    _check(o.lr > 0 and math.isfinite(o.lr), "--lr", f"must be a positive number, got {o.lr}")
    _check(o.weight_decay >= 0, "--weight-decay", f"must be >= 0, got {o.weight_decay}")
    _check(0 <= o.warmup_epochs <= o.epochs, "optim.warmup_epochs", f"must be in [0, epochs], got {o.warmup_epochs}")
    _check(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", f"must be in [0, 1], got {o.min_lr_ratio}")
    _check(o.grad_clip >= 0, "--grad-clip", f"must be >= 0, got {o.grad_clip}")
    _check(0 <= o.ema_decay < 1, "--ema", f"must be in [0, 1), got {o.ema_decay}")
    _check(o.optimizer in ("adamw", "sgd"), "--optimizer", f"unknown {o.optimizer!r}; valid: adamw, sgd")
    _check(o.amp in ("auto", "none", "bf16", "fp16"), "--amp", f"unknown {o.amp!r}; valid: auto, none, bf16, fp16")
    _check(m.image_size >= 32 and m.image_size % 16 == 0, "--image-size",
           f"must be a multiple of 16 and >= 32, got {m.image_size}")
    _check(m.embedding_dim >= 2, "--embedding-dim", f"must be >= 2, got {m.embedding_dim}")
    _check(0 <= m.dropout < 1, "--dropout", f"must be in [0, 1), got {m.dropout}")
    _check(m.neck in ("gdc", "flatten", "gap"), "model.neck", f"unknown {m.neck!r}; valid: gdc, flatten, gap")
    _check(m.kernel_backend in ("auto", "torch", "triton"), "--kernels",
           f"unknown {m.kernel_backend!r}; valid: auto, torch, triton")
    _check(0 <= d.val_fraction < 1, "--val-fraction", f"must be in [0, 1), got {d.val_fraction}")
    _check(d.min_images >= 1, "--min-images", f"must be >= 1, got {d.min_images}")
    _check(d.num_workers >= 0, "--workers", f"must be >= 0, got {d.num_workers}")
    _check(d.sampler in ("random", "pk"), "--sampler", f"unknown {d.sampler!r}; valid: random, pk")
    _check(d.pk_identities >= 2 and d.pk_images >= 2, "--pk", "P and K must both be >= 2")
    _check(0 <= l.label_smoothing < 1, "--label-smoothing", f"must be in [0, 1), got {l.label_smoothing}")
    _check(l.s > 0, "--scale", f"must be > 0, got {l.s}")
    _check(l.pair_weight >= 0, "--pair-weight", f"must be >= 0, got {l.pair_weight}")
    for name in ("hflip", "vflip", "random_erasing"):
        p = getattr(a, name)
        _check(0 <= p <= 1, f"augment.{name}", f"probability must be in [0, 1], got {p}")
    _check(0 < a.crop_scale <= 1, "augment.crop_scale", f"must be in (0, 1], got {a.crop_scale}")
    for name in ("color_jitter", "perspective", "mixup", "cutmix"):
        _check(getattr(a, name) >= 0, f"augment.{name}", f"must be >= 0, got {getattr(a, name)}")
    _check(0 <= a.perspective <= 1, "augment.perspective", f"must be in [0, 1], got {a.perspective}")
    _check(0 <= a.randaugment <= 30, "augment.randaugment", f"magnitude must be in [0, 30], got {a.randaugment}")
    _check(cfg.time_budget >= 0, "--time-budget", f"must be >= 0, got {cfg.time_budget}")
    _check(cfg.device in ("auto", "cpu", "cuda") or cfg.device.startswith("cuda:"), "--device",
           f"unknown {cfg.device!r}; valid: auto, cpu, cuda")


def save_config(cfg: TrainConfig, path: Path) -> None:
    from facefuse.core.files import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(_plain(cfg.to_dict()), sort_keys=False))


def _plain(v):
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v
