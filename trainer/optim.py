"""Optimiser with no weight decay on norms and biases, warm-up + cosine schedule, EMA of weights."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from facefuse.trainer.config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay conv/linear weights; not norms, biases, layer scales.  Center-loss centers are not
    decayed; with their own ``lr`` they get a group of their own at that fixed lr."""
    decay, no_decay, centers = [], [], []
    special_lr = None
    for module_name, module in model.named_modules():
        is_center_loss = hasattr(module, "centers")
        lr = getattr(module, "lr", None) if is_center_loss else None
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            if lr is not None:
                centers.append(p)
                special_lr = lr
            elif is_center_loss or p.ndim <= 1 or name.endswith("bias") or "gamma" in name:
                no_decay.append(p)
            else:
                decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if centers:
        groups.append({"params": centers, "weight_decay": 0.0, "lr": special_lr, "fixed_lr": True})
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999))


def lr_factor(step: int, warmup_steps: int, progress: float, min_ratio: float) -> float:
    """Linear warm-up over ``warmup_steps`` times a cosine from 1 to ``min_ratio`` over ``progress``.

    ``progress`` is the fraction of training done: steps over total steps, or time spent over the
    time budget, so the same schedule anneals fully within a budget."""
    progress = min(max(progress, 0.0), 1.0)
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    return warm * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(optimizer: torch.optim.Optimizer, base_lr: float, factor: float) -> float:
    for g in optimizer.param_groups:
        if not g.get("fixed_lr"):
            g["lr"] = base_lr * factor
    return base_lr * factor


def build_ema(model: nn.Module, decay: float) -> AveragedModel | None:
    if decay <= 0:
        return None
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
