"""Training configuration: dataclass defaults, overridden by a config file, overridden by options.

The resolved config is written to ``RUN_DIR/config.yaml`` so that a run can be reproduced with
``facefuse train --config RUN_DIR/config.yaml``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
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


def _f(default, help: str, **kw):
    """A config field with its help text (shown by ``facefuse train --help``)."""
    if isinstance(default, (list, dict)):  # mutable: a fresh copy per config
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class DataConfig:
    root: str = _f("", "Training images: one sub-folder per identity.", option="data")
    exclude_identities: str | None = _f(None, "File of identity names (one per line) to leave out.")
    min_images: int = _f(2, "Drop identities with fewer images.")
    val_fraction: float = _f(0.03, "Fraction of each identity's images held out for closed-set accuracy.")
    val_pairs: str | None = _f(None, "Verification pairs for validation: LFW pairs.txt or `path_a path_b label` lines.")
    val_pairs_root: str | None = _f(None, "Folder the pairs' image paths are relative to (default: beside the file).")
    val_pairs_fold: int | None = _f(None, "Use only this fold of an LFW pairs file.")
    val_pairs_disjoint: bool = _f(False, "Leave the validation pairs' identities out of training (open-set).")
    skip_bad: bool = _f(False, "Skip corrupt images and empty identity folders, with a count.")
    verify_images: bool = _f(True, "Decode every image once before training (a bad file is named up front).")
    workers: int = _f(2, "DataLoader worker processes.")
    alignment: str = _f("template", "How the training images are framed, recorded in the model so photos can be "
                        "brought alike (align=auto): template (face crops aligned to the 112x112 five-point "
                        "template, as lfw-112 and `facefuse align` output are) or none (photos as they are).")
    sampler: str = _f("random", "Batch sampler: random, or pk (P identities x K images, for pair losses).")
    pk_identities: int = _f(32, "P: identities per batch (sampler pk).")
    pk_images: int = _f(4, "K: images per identity (sampler pk).")
    mean: tuple[float, float, float] = _f((0.5, 0.5, 0.5), "Per-channel input mean.")
    std: tuple[float, float, float] = _f((0.5, 0.5, 0.5), "Per-channel input std.")


@dataclass
class AugmentConfig:
    hflip: float = _f(0.5, "Horizontal flip probability.")
    vflip: float = _f(0.0, "Vertical flip probability.")
    crop_scale: float = _f(1.0, "RandomResizedCrop minimum scale (1 = off).")
    color_jitter: float = _f(0.0, "ColorJitter brightness/contrast/saturation strength (0 = off).")
    perspective: float = _f(0.0, "RandomPerspective distortion (0 = off).")
    randaugment: int = _f(0, "RandAugment magnitude (0 = off).")
    rotate: float = _f(0.0, "Misalignment jitter: rotation up to +-this many degrees (0 = off).")
    translate: float = _f(0.0, "Misalignment jitter: shift up to this fraction of the side (0 = off).")
    zoom: tuple[float, float] = _f((1.0, 1.0), "Misalignment jitter: scale range (lo, hi); lo < 1 zooms out "
                                               "(a wider, detector-style crop).")
    grayscale: float = _f(0.0, "Probability of a grey-scale image (3 equal channels).")
    blur: float = _f(0.0, "Probability of a Gaussian blur (sigma 0.2-1.5 px at 64 px, scaled with the size).")
    jpeg: float = _f(0.0, "Probability of a JPEG re-encode at quality 20-90.")
    shading: float = _f(0.0, "Directional lighting: a random linear brightness ramp of up to this strength "
                             "edge to edge (0 = off; 0.8 darkens one side to 0.2).")
    random_erasing: float = _f(0.0, "RandomErasing probability.")
    mixup: float = _f(0.0, "MixUp alpha (0 = off).")
    cutmix: float = _f(0.0, "CutMix alpha (0 = off).")
    pipeline: list | None = _f(None, "Explicit v2 pipeline [[name, {kwargs}], ...]; replaces the options above.")


@dataclass
class ModelConfig:
    backbone: str = _f("convnext_atto", "Backbone (see the registry's names below).")
    embedding_dim: int = _f(256, "Embedding size D.")
    image_size: int = _f(64, "Model input side in pixels (a multiple of 16).")
    dropout: float = _f(0.0, "Dropout before the classifier.")
    width: float = _f(0.5, "Backbone channel multiplier.")
    drop_path: float = _f(0.0, "Stochastic depth rate (residual blocks of every backbone).")
    neck: str = _f("gdc", "Feature map to embedding.")
    kernels: str = _f("torch", "auto, torch or triton (fused margin head and depthwise conv; auto: triton on CUDA).")


@dataclass
class LossConfig:
    name: str = _f("sphereface", "Classification head, or a pair loss alone.", option="loss")
    scale: float = _f(32.0, "Logit scale s of the normalised heads.")
    margin: float | None = _f(None, "The named head's margin: radians (arcface), cosine (cosface), m (sphereface); "
                                    "default: the head's own.")
    m1: float = _f(1.0, "Combined margin cos(m1*theta + m2) - m3: m1 (head `combined` only).")
    m2: float = _f(0.0, "Combined margin: m2 (head `combined` only).")
    m3: float = _f(0.0, "Combined margin: m3 (head `combined` only).")
    easy_margin: bool = _f(False, "insightface's easy margin: the margin only where cos(theta) > 0.")
    label_smoothing: float = _f(0.0, "Label smoothing of the cross-entropy.")
    head_options: dict = _f({}, "Settings of the head in use, by its own names (adaface: h, t_alpha; "
                                "subcenter_arcface: subcenters), e.g. --set loss.head_options.subcenters=2.")
    pair_loss: str | None = _f(None, "Joint pair loss added to the classification loss.")
    pair_weight: float = _f(1.0, "lambda in classification + lambda * pair loss.")
    pair_options: dict = _f({}, "Settings of the pair loss in use, by its own names "
                                "(e.g. --set loss.pair_options.margin=0.3).")
    head_parallel: bool = _f(False, "Shard the margin head's class centres over the torchrun processes "
                                    "(model parallel, Partial FC style); needs 2+ processes.")
    sample_rate: float = _f(1.0, "Partial FC class sampling with --head-parallel: keep every class of the batch "
                                 "and this fraction of the others per step (1 = the full head).")


@dataclass
class OptimConfig:
    optimizer: str = _f("adamw", "adamw or sgd.")
    lr: float = _f(3e-3, "Peak learning rate.")
    weight_decay: float = _f(0.05, "Weight decay (not applied to norms and biases).")
    momentum: float = _f(0.9, "SGD momentum.")
    epochs: int = _f(20, "Training epochs.")
    batch_size: int = _f(128, "Global batch size (split over torchrun processes).")
    warmup_epochs: float = _f(1.0, "Linear warm-up length in epochs.")
    min_lr_ratio: float = _f(0.01, "The cosine decays to lr * min_lr_ratio.")
    grad_clip: float = _f(5.0, "Max global gradient norm (0 = off).")
    amp: str = _f("auto", "Mixed precision: auto (bf16 on CUDA, none on CPU), none, bf16, fp16.")
    ema_decay: float = _f(0.0, "EMA decay of the weights (0 = off).")
    channels_last: bool = _f(True, "channels_last memory format on CUDA.")


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    out: str = _f("", "Run folder (config, checkpoints, metrics, summary).")
    device: str = _f("auto", "auto, cpu, cuda or cuda:N.")
    seed: int = _f(0, "Random seed.")
    init_from: str | None = _f(None, "Sequential fine-tuning: start from this run/checkpoint's embedder.")
    time_budget: float = _f(0.0, "Minutes spent in training steps (waits for data and validation not counted); "
                                 "the schedule follows the budget and stops when spent (0 = none).")
    checkpoint_minutes: float = _f(5.0, "Also checkpoint this often within an epoch.")
    eval_every: int = _f(1, "Validate every this many epochs.")
    threads: int = _f(0, "CPU threads for torch (0 = torch default).")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = ("data", "augment", "model", "loss", "optim")


def leaf_fields(cls=TrainConfig, prefix: str = ""):
    """``(dotted key, dataclasses.Field, resolved type)`` of every setting, in declaration order."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            yield from leaf_fields(t, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f, t


def default_of(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


# keys of earlier releases, read from old config files and model files
LEGACY_KEYS = {"data.num_workers": "data.workers", "model.kernel_backend": "model.kernels", "loss.s": "loss.scale",
               "loss.pair": "loss.pair_loss"}
_FIELDS = {key: (f, t) for key, f, t in leaf_fields()}


def coerce(key: str, value: Any, where: str) -> Any:
    """``value`` as the type of setting ``key`` (YAML reads ``3e-3`` as a string, options give strings)."""
    t = _FIELDS[key][1]
    optional = type(None) in typing.get_args(t)
    base = next(a for a in typing.get_args(t) if a is not type(None)) if optional else t
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "")):
        if optional:
            return None
        raise FacefuseError(f"{where}: must be set (got nothing)")
    try:
        return _as_type(base, value)
    except (ValueError, TypeError):
        raise FacefuseError(f"{where}: expected {_type_name(base)}, got {value!r}") from None


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _as_type(base, value):
    """Strict conversion: no bool for a number, no fractional float for an int, no list for a str."""
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
            return value.lower() in _TRUE
        raise ValueError
    if isinstance(value, bool) and base in (int, float, str):
        raise ValueError
    if base is int:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError
        return int(value, 10) if isinstance(value, str) else int(value)
    if base is float:
        return float(value)
    if base is str:
        if not isinstance(value, (str, int, float)):
            raise ValueError
        return str(value)
    origin = typing.get_origin(base) or base
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(typing.get_args(base)):
            raise ValueError
        return tuple(float(v) for v in value)
    if not isinstance(value, origin):  # dict or list settings
        raise ValueError
    return value


def _type_name(base) -> str:
    origin = typing.get_origin(base) or base
    if origin is tuple:
        return f"a list of {len(typing.get_args(base))} numbers"
    return {dict: "a mapping", list: "a list"}.get(origin, getattr(origin, "__name__", str(origin)))


def flatten(values: dict, where: str, prefix: str = "") -> dict[str, Any]:
    """A nested mapping (a config file) as ``{dotted key: value}``; unknown keys are an error naming them."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        dotted = LEGACY_KEYS.get(f"{prefix}{key}", f"{prefix}{key}")
        if dotted in _FIELDS:
            out[dotted] = value
        elif dotted in SECTIONS and isinstance(value, dict):
            out.update(flatten(value, where, f"{dotted}."))
        elif dotted in SECTIONS:
            raise FacefuseError(f"{where}: {dotted!r} must be a mapping")
        else:
            raise FacefuseError(f"{where}: unknown key {dotted!r}; {_suggest(dotted)}")
    return out


def _suggest(dotted: str) -> str:
    section = dotted.rsplit(".", 1)[0] if "." in dotted else ""
    names = [k for k in _FIELDS if k.startswith(f"{section}.")] if section in SECTIONS else list(SECTIONS) + [
        k for k in _FIELDS if "." not in k]
    return f"valid: {', '.join(names)}"


def parse_set(items) -> dict[str, Any]:
    """``--set key=value`` items as ``{dotted key: YAML-parsed value}``; ``loss.pair_options.margin=0.3``
    sets one entry of a mapping setting."""
    out: dict[str, Any] = {}
    for item in items or ():
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise FacefuseError(f"--set {item}: expected KEY=VALUE, e.g. --set optim.lr=3e-3")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text
        out[key] = value
    return out


def load_config_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FacefuseError(f"--config {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8-sig")
        values = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FacefuseError(f"--config {path}: not valid YAML/JSON ({str(exc).splitlines()[0]})") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise FacefuseError(f"--config {path}: expected a mapping at the top level")
    return values


def resolve_config(config_files=None, overrides: dict | None = None,
                   sources: dict | None = None) -> TrainConfig:
    """Defaults <- each config file in order <- ``overrides`` ({dotted key: value}); then validated.

    ``sources`` names how the user wrote each override (``{"optim.lr": "--lr"}``); errors name
    the key as the user wrote it, in a file (``--config F: optim.lr``) or as an option."""
    if isinstance(config_files, (str, Path)):
        config_files = [config_files]
    values: dict[str, Any] = {}
    where: dict[str, str] = {}
    for path in config_files or ():
        for key, value in flatten(load_config_file(path), f"--config {path}").items():
            values[key], where[key] = value, f"--config {path}: {key}"
    for key, value in (overrides or {}).items():
        label = (sources or {}).get(key, key)
        field_key, entry = _split_mapping_key(key, label)
        if entry is None:
            values[field_key], where[field_key] = value, label
        else:  # one entry of a mapping setting
            base = dict(values.get(field_key) or {})
            base[entry] = value
            values[field_key], where[field_key] = base, label
    cfg = TrainConfig()
    for key, value in values.items():
        _set(cfg, key, coerce(key, value, where[key]))
    validate(cfg, where)
    return cfg


def _split_mapping_key(key: str, label: str) -> tuple[str, str | None]:
    key = LEGACY_KEYS.get(key, key)
    if key in _FIELDS:
        return key, None
    parent, _, entry = key.rpartition(".")
    if parent in _FIELDS and _FIELDS[parent][1] is dict:  # one entry of a mapping setting
        return parent, entry
    raise FacefuseError(f"{label}: unknown key {key!r}; {_suggest(key)}")


def _set(cfg: TrainConfig, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    obj = cfg
    for p in parents:
        obj = getattr(obj, p)
    setattr(obj, leaf, value)


def validate(cfg: TrainConfig, where: dict | None = None) -> None:
    """Range checks; each error names the key as the user wrote it (option or file key)."""
    name = lambda key: (where or {}).get(key, key)  # noqa: E731

    def check(cond: bool, key: str, msg: str) -> None:
        if not cond:
            raise FacefuseError(f"{name(key)}: {msg}")

    def one_of(key: str, valid) -> None:
        value = _get(cfg, key)
        check(value in valid, key, f"unknown {value!r}; valid: {', '.join(valid)}")

    o, d, m, l, a = cfg.optim, cfg.data, cfg.model, cfg.loss, cfg.augment
    check(o.epochs >= 1, "optim.epochs", f"must be >= 1, got {o.epochs}")
    check(o.batch_size >= 2, "optim.batch_size", f"must be >= 2, got {o.batch_size}")
    check(o.lr > 0 and math.isfinite(o.lr), "optim.lr", f"must be a positive number, got {o.lr}")
    check(o.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {o.weight_decay}")
    check(0 <= o.warmup_epochs <= o.epochs, "optim.warmup_epochs", f"must be in [0, epochs], got {o.warmup_epochs}")
    check(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", f"must be in [0, 1], got {o.min_lr_ratio}")
    check(o.grad_clip >= 0, "optim.grad_clip", f"must be >= 0, got {o.grad_clip}")
    check(0 <= o.ema_decay < 1, "optim.ema_decay", f"must be in [0, 1), got {o.ema_decay}")
    one_of("optim.optimizer", ("adamw", "sgd"))
    one_of("optim.amp", ("auto", "none", "bf16", "fp16"))
    check(m.image_size >= 32 and m.image_size % 16 == 0, "model.image_size",
          f"must be a multiple of 16 and >= 32, got {m.image_size}")
    check(m.embedding_dim >= 2, "model.embedding_dim", f"must be >= 2, got {m.embedding_dim}")
    check(0 <= m.dropout < 1, "model.dropout", f"must be in [0, 1), got {m.dropout}")
    check(m.width > 0, "model.width", f"must be > 0, got {m.width}")
    check(0 <= m.drop_path < 1, "model.drop_path", f"must be in [0, 1), got {m.drop_path}")
    one_of("model.kernels", ("auto", "torch", "triton"))
    check(0 <= d.val_fraction < 1, "data.val_fraction", f"must be in [0, 1), got {d.val_fraction}")
    check(d.min_images >= 1, "data.min_images", f"must be >= 1, got {d.min_images}")
    check(d.workers >= 0, "data.workers", f"must be >= 0, got {d.workers}")
    one_of("data.sampler", ("random", "pk"))
    one_of("data.alignment", ("template", "none"))
    check(d.pk_identities >= 2, "data.pk_identities", f"must be >= 2, got {d.pk_identities}")
    check(d.pk_images >= 2, "data.pk_images", f"must be >= 2, got {d.pk_images}")
    check(0 <= l.label_smoothing < 1, "loss.label_smoothing", f"must be in [0, 1), got {l.label_smoothing}")
    check(l.scale > 0 and math.isfinite(l.scale), "loss.scale", f"must be > 0, got {l.scale}")
    check(l.pair_weight >= 0, "loss.pair_weight", f"must be >= 0, got {l.pair_weight}")
    check(0 < l.sample_rate <= 1, "loss.sample_rate", f"must be in (0, 1], got {l.sample_rate}")
    check(l.sample_rate == 1 or l.head_parallel, "loss.sample_rate", "class sampling needs --head-parallel")
    for key in ("hflip", "vflip", "random_erasing", "grayscale", "blur", "jpeg"):
        p = getattr(a, key)
        check(0 <= p <= 1, f"augment.{key}", f"probability must be in [0, 1], got {p}")
    check(0 < a.crop_scale <= 1, "augment.crop_scale", f"must be in (0, 1], got {a.crop_scale}")
    for key in ("color_jitter", "perspective", "mixup", "cutmix"):
        check(getattr(a, key) >= 0, f"augment.{key}", f"must be >= 0, got {getattr(a, key)}")
    check(0 <= a.perspective <= 1, "augment.perspective", f"must be in [0, 1], got {a.perspective}")
    check(0 <= a.rotate <= 180, "augment.rotate", f"degrees must be in [0, 180], got {a.rotate}")
    check(0 <= a.translate < 0.5, "augment.translate", f"must be in [0, 0.5), got {a.translate}")
    check(len(a.zoom) == 2 and 0 < a.zoom[0] <= a.zoom[1] <= 4, "augment.zoom",
          f"must be (lo, hi) with 0 < lo <= hi <= 4, got {a.zoom}")
    check(0 <= a.shading < 1, "augment.shading", f"must be in [0, 1), got {a.shading}")
    check(0 <= a.randaugment <= 30, "augment.randaugment", f"magnitude must be in [0, 30], got {a.randaugment}")
    check(cfg.time_budget >= 0, "time_budget", f"must be >= 0, got {cfg.time_budget}")
    check(cfg.eval_every >= 1, "eval_every", f"must be >= 1, got {cfg.eval_every}")
    check(cfg.device in ("auto", "cpu", "cuda") or cfg.device.startswith("cuda:"), "device",
          f"unknown {cfg.device!r}; valid: auto, cpu, cuda, cuda:N")
    _validate_names(cfg, check)


def _validate_names(cfg: TrainConfig, check) -> None:
    """Names that live in registries: backbone, neck, loss, pair loss and its settings."""
    from facefuse.trainer.backbones import BACKBONES
    from facefuse.trainer.losses import HEADS, PAIR_LOSSES, pair_loss_settings
    from facefuse.trainer.losses.margin import head_settings
    from facefuse.trainer.model import NECKS

    l = cfg.loss
    for key, registry in (("model.backbone", BACKBONES), ("model.neck", NECKS)):
        value = _get(cfg, key)
        check(value in registry, key, f"unknown {value!r}; valid: {', '.join(registry.names())}")
    losses = [*HEADS.names(), *PAIR_LOSSES.names()]
    check(l.name in losses, "loss.name", f"unknown {l.name!r}; valid: {', '.join(losses)}")
    check(l.pair_loss is None or l.pair_loss in PAIR_LOSSES, "loss.pair_loss",
          f"unknown {l.pair_loss!r}; valid: {', '.join(PAIR_LOSSES.names())}")
    check(not (l.pair_loss and l.name in PAIR_LOSSES), "loss.pair_loss",
          f"--loss {l.name} is already a pair loss; a joint pair loss needs a classification head")
    check(not (l.head_parallel and l.name in PAIR_LOSSES), "loss.head_parallel",
          f"--loss {l.name} is a pair loss; the sharded head needs a margin head (arcface, cosface, ...)")
    check(not (l.head_parallel and l.name == "softmax"), "loss.head_parallel",
          "the sharded head needs a margin head (arcface, cosface, sphereface, normface, combined), not softmax")
    if l.name in HEADS:
        valid_head = sorted(head_settings(l.name))
        for key in l.head_options:
            check(key in valid_head, "loss.head_options",
                  f"{key}: not a setting of the {l.name!r} head; valid: {', '.join(valid_head) or 'none'}")
        check(not (l.head_options and l.head_parallel), "loss.head_options",
              "the sharded head (--head-parallel) takes no head options")
    else:
        check(not l.head_options, "loss.head_options", f"set, but --loss {l.name} is not a classification head")
    in_use = pair_loss_in_use(cfg)
    if in_use is None:
        check(not l.pair_options, "loss.pair_options", "set, but no pair loss is in use")
    else:
        valid = pair_loss_settings(in_use)
        for key in l.pair_options:
            check(key in valid, "loss.pair_options",
                  f"{key}: not a setting of the {in_use!r} pair loss; valid: {', '.join(valid)}")


def pair_loss_in_use(cfg: TrainConfig) -> str | None:
    """The pair loss trained: ``loss.pair_loss`` beside a head, or ``loss.name`` itself."""
    from facefuse.trainer.losses import PAIR_LOSSES

    return cfg.loss.pair_loss or (cfg.loss.name if cfg.loss.name in PAIR_LOSSES else None)


def _get(cfg: TrainConfig, key: str):
    obj = cfg
    for p in key.split("."):
        obj = getattr(obj, p)
    return obj


def save_config(cfg: TrainConfig, path: Path) -> None:
    from facefuse.core.files import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(_plain(cfg.to_dict()), sort_keys=False))


def _plain(v):
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v
