"""Training state with a sharded head: what is replicated (saved once, by rank 0) and what each rank
owns (its centres, their optimiser and EMA state, its RNG). Layout: :mod:`trainer.checkpoint`."""

from __future__ import annotations

import torch

HEAD_KEY = "head.weight"          # in FaceModel.state_dict()
EMA_HEAD_KEY = "module.head.weight"  # in AveragedModel.state_dict()


def own_param_group(optimizer: torch.optim.Optimizer, weight: torch.nn.Parameter) -> None:
    """Move the shard ``weight`` into a param group of its own (last), with the settings of the group
    it was in: same update, and its optimiser state is the last index of ``state_dict()``."""
    for group in optimizer.param_groups:
        if any(p is weight for p in group["params"]):
            group["params"] = [p for p in group["params"] if p is not weight]
            settings = {k: v for k, v in group.items() if k != "params"}
            break
    else:
        raise ValueError("the head's weight is not in the optimiser")
    optimizer.param_groups[:] = [g for g in optimizer.param_groups if g["params"]]
    optimizer.add_param_group({**settings, "params": [weight]})


def _head_index(optimizer_state: dict) -> int:
    return optimizer_state["param_groups"][-1]["params"][0]


def split(model_state: dict, optimizer_state: dict, ema_state: dict | None) -> tuple[dict, dict]:
    """``(replicated, shard)``: the three state dicts without the head, and the head's parts."""
    model_state = dict(model_state)
    opt = {**optimizer_state, "state": dict(optimizer_state["state"])}
    shard = {"weight": model_state.pop(HEAD_KEY), "optimizer": opt["state"].pop(_head_index(opt), None)}
    if ema_state is not None:
        ema_state = dict(ema_state)
        shard["ema"] = ema_state.pop(EMA_HEAD_KEY)
    return {"model": model_state, "optimizer": opt, "ema_full": ema_state}, shard


def merge(replicated: dict, shard: dict) -> tuple[dict, dict, dict | None]:
    """Inverse of :func:`split`: ``(model_state, optimizer_state, ema_state)`` with the head back."""
    model_state = {**replicated["model"], HEAD_KEY: shard["weight"]}
    opt = {**replicated["optimizer"], "state": dict(replicated["optimizer"]["state"])}
    if shard.get("optimizer") is not None:
        opt["state"][_head_index(opt)] = shard["optimizer"]
    ema = replicated.get("ema_full")
    if ema is not None and shard.get("ema") is not None:
        ema = {**ema, EMA_HEAD_KEY: shard["ema"]}
    return model_state, opt, ema
