"""The training loop: one code path for one process and for torchrun (DDP).

Resume is exact: model, optimiser, EMA, AMP scaler, epoch and step within the epoch, elapsed time
and every RNG are checkpointed; batch order and per-sample augmentation depend only on
(seed, epoch, position), so a resumed run replays the same batches a run without interruption sees.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from facefuse.trainer import checkpoint as ckpt
from facefuse.trainer import distributed
from facefuse.trainer.augment import BatchMixer, build_train_transform
from facefuse.trainer.config import TrainConfig, save_config
from facefuse.trainer.data import (FaceDataset, ImageList, eval_transform, read_identity_list, scan_identities,
                          split_holdout, verify_images)
from facefuse.core.errors import FacefuseError, ParameterError
from facefuse.trainer.evaluate import PairsValidator, classification_accuracy
from facefuse.core.files import append_line, atomic_write_text
from facefuse.trainer.model import build_face_model, count_parameters
from facefuse.trainer.ops import resolve_backend
from facefuse.trainer.optim import build_ema, build_optimizer, lr_factor, set_lr
from facefuse.trainer.sampler import PKBatchSampler, RandomBatchSampler
from facefuse.trainer import sharded_state
from facefuse.trainer.sharded_head import clip_grad_norm as clip_sharded_grad_norm


class SeededDataset(torch.utils.data.Dataset):
    """Wraps a dataset so that item ``(index, seed)`` runs its random transforms under ``seed``."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, item):
        index, seed = item
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.ds[index]


@dataclass
class RunState:
    epoch: int = 0            # epochs completed
    step: int = 0             # optimiser steps done in total
    step_in_epoch: int = 0    # steps done in the current epoch (mid-epoch checkpoints)
    elapsed: float = 0.0      # training seconds spent (time budget)
    images_seen: int = 0
    history: list = field(default_factory=list)


class _Stop:
    """Turns SIGTERM (and SIGINT) into a flag checked between steps, so the loop can checkpoint."""

    def __init__(self):
        self.signal = None
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not in the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # second signal: stop now
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ParameterError("device", name, "CUDA is not available on this machine (use device=cpu)")
    return torch.device(name)


def _autocast_factory(device: torch.device, amp: str):
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "none"
    if amp == "none":
        return contextlib.nullcontext, None
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    if device.type == "cpu" and amp == "fp16":
        raise ParameterError("optim.amp", "fp16", "not supported on CPU (use bf16 or none)")
    return (lambda: torch.autocast(device.type, dtype=dtype)), amp


def prepare_data(cfg: TrainConfig, log) -> tuple[ImageList, ImageList, list[str]]:
    exclude = read_identity_list(cfg.data.exclude_identities) if cfg.data.exclude_identities else set()
    if cfg.data.val_pairs_disjoint:
        if not cfg.data.val_pairs:
            raise ParameterError("data.val_pairs_disjoint", True, "needs data.val_pairs=")
        exclude |= PairsValidator(cfg.data.val_pairs, cfg.data.val_pairs_root, cfg.data.val_pairs_fold).identities()
    images, skipped = scan_identities(cfg.data.root, exclude=exclude, min_images=cfg.data.min_images,
                                      skip_bad=cfg.data.skip_bad)
    if cfg.data.verify_images:
        images, bad = verify_images(images, skip_bad=cfg.data.skip_bad)
        skipped += bad
    if skipped:
        log(f"skipped {len(skipped)} bad files/folders (--skip-bad), e.g. {skipped[0]}")
    train, val = split_holdout(images, cfg.data.val_fraction, cfg.seed)
    return train, val, skipped


class Trainer:
    def __init__(self, cfg: TrainConfig, *, resume: bool = False, progress: bool = True, log=print):
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.resume = resume
        self.progress = progress
        self.dist = distributed.init(resolve_device(cfg.device).type)
        self.device = resolve_device(cfg.device)
        if self.device.type == "cuda" and self.dist.enabled:
            self.device = torch.device("cuda", self.dist.local_rank)
        self._log = log
        self.state = RunState()

    def log(self, msg: str) -> None:
        if self.dist.is_main:
            self._log(msg)

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        last = self.out / "checkpoints" / "last.pt"
        if self.resume and not last.is_file():
            raise ParameterError("resume", True, f"{last} not found (nothing to resume in out={self.out})")
        if not self.resume and last.is_file():
            raise ParameterError("out", self.out, "already holds a run; pass resume=True to continue it or choose "
                                "another out=")
        cfg.model.kernels = resolve_backend(cfg.model.kernels, self.device)
        if cfg.model.kernels == "triton" and self.device.type != "cuda":
            from facefuse.kernels._common import INTERPRETING

            if not INTERPRETING:
                raise ParameterError("model.kernels", "triton", "needs device=cuda (or TRITON_INTERPRET=1 to interpret "
                                     "the kernels on CPU, slowly); use model.kernels=torch")
        self.sharded = cfg.loss.head_parallel
        if self.resume:
            self._check_resume_world(last)
        if self.sharded and not self.dist.enabled:
            raise ParameterError("loss.head_parallel", True, "needs 2+ processes (torchrun --nproc_per_node N ...); "
                                 "this run has 1")
        torch.manual_seed(cfg.seed)
        self.train_set, self.val_set, self.skipped = prepare_data(cfg, self.log)
        self.classes = self.train_set.classes
        try:
            self.face_model = build_face_model(cfg.model, cfg.loss, len(self.classes), seed=cfg.seed).to(self.device)
        except ValueError as exc:  # unknown backbone / loss names, out-of-range loss parameters
            raise FacefuseError(str(exc)) from None
        self.face_model.set_kernel_backend(cfg.model.kernels)
        if self.device.type == "cuda" and cfg.optim.channels_last:
            self.face_model = self.face_model.to(memory_format=torch.channels_last)
        self.ema = build_ema(self.face_model, cfg.optim.ema_decay)
        module = self.face_model
        if self.dist.enabled:
            module = distributed.convert_batchnorm(module, self.device.type)
            self.face_model = module
            module.cross_rank_pairs = True
            if self.sharded:  # each rank owns its shard: DDP must not average it
                DDP._set_params_and_buffers_to_ignore_for_model(module, [sharded_state.HEAD_KEY])
            module = DDP(module, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.model = module
        self.optimizer = build_optimizer(self.face_model, cfg.optim)
        if self.sharded:
            sharded_state.own_param_group(self.optimizer, self.face_model.head.weight)
        self.autocast, amp = _autocast_factory(self.device, cfg.optim.amp)
        self.scaler = torch.amp.GradScaler(self.device.type) if amp == "fp16" else None
        self.mixer = BatchMixer(cfg.augment, len(self.classes))
        self._build_loaders()
        self.validator = None
        if cfg.data.val_pairs:
            self.validator = PairsValidator(cfg.data.val_pairs, cfg.data.val_pairs_root, cfg.data.val_pairs_fold)
        if cfg.init_from:
            self._init_from(cfg.init_from)
        if self.resume:
            self._load(last)
        elif self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out / "config.yaml")
            atomic_write_text(self.out / "classes.txt", "\n".join(self.classes) + "\n")
            (self.out / "metrics.jsonl").unlink(missing_ok=True)
        self.meta = ckpt.ModelMeta.for_model(cfg.model, self.face_model.embedder, len(self.classes),
                                             cfg.data.mean, cfg.data.std, cfg.data.alignment)

    def _build_loaders(self) -> None:
        cfg = self.cfg
        train_tf = build_train_transform(cfg.augment, cfg.model.image_size, cfg.data.mean, cfg.data.std)
        kw = dict(seed=cfg.seed, rank=self.dist.rank, world_size=self.dist.world_size)
        try:
            if cfg.data.sampler == "pk":
                self.sampler = PKBatchSampler(self.train_set.labels, cfg.data.pk_identities, cfg.data.pk_images, **kw)
            else:
                self.sampler = RandomBatchSampler(self.train_set.labels, cfg.optim.batch_size, **kw)
        except ValueError as exc:
            raise FacefuseError(str(exc)) from None
        workers = cfg.data.workers
        self.train_loader = DataLoader(SeededDataset(FaceDataset(self.train_set, train_tf)),
                                       batch_sampler=self.sampler, num_workers=workers,
                                       pin_memory=self.device.type == "cuda", generator=torch.Generator(),
                                       prefetch_factor=4 if workers else None)
        self.val_loader = None
        if len(self.val_set) and self.dist.is_main:
            tf = eval_transform(cfg.model.image_size, cfg.data.mean, cfg.data.std)
            self.val_loader = DataLoader(FaceDataset(self.val_set, tf), batch_size=256, num_workers=workers)
        self.steps_per_epoch = len(self.sampler)

    def _init_from(self, path: str) -> None:
        """Sequential fine-tuning: embedder weights from another run; heads start fresh."""
        payload = ckpt.load(ckpt.resolve_model_path(path))
        state = payload["embedder"] if payload.get("kind") == "model" else ckpt._embedder_state(payload["model"])
        try:
            self.face_model.embedder.load_state_dict(state)
        except RuntimeError as exc:
            raise ParameterError("init_from", path, f"weights do not fit model.backbone={self.cfg.model.backbone} "
                                f"({str(exc).splitlines()[0][:120]})") from None
        self.log(f"initialised the embedder from {path}")

    # ------------------------------------------------------------------ checkpoints
    def _save(self) -> None:
        if not (self.dist.is_main or self.sharded):
            return
        s = self.state
        folder = self.out / "checkpoints"
        parts = {"model": self.face_model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "ema_full": self.ema.state_dict() if self.ema else None}
        extra = {}
        if self.sharded:  # every rank writes its shard first; last.pt then names the step
            parts, shard = sharded_state.split(parts["model"], parts["optimizer"], parts["ema_full"])
            head = self.face_model.head
            ckpt.save(ckpt.head_shard_path(folder, self.dist.rank, self.dist.world_size, s.step), {
                "kind": "head-shard", "rank": self.dist.rank, "world_size": self.dist.world_size, "step": s.step,
                "classes": [head.start, head.stop], **shard, "rng": ckpt.rng_state()})
            distributed.barrier(self.dist)
            extra = {"head_parallel": {"world_size": self.dist.world_size, "step": s.step,
                                       "num_classes": len(self.classes)}}
        if self.dist.is_main:
            ckpt.save(folder / "last.pt", {
                "kind": "train", "meta": self.meta.to_dict(), "config": self.cfg.to_dict(), "classes": self.classes,
                **parts, "ema": self.ema.module.embedder.state_dict() if self.ema else None,
                "scaler": self.scaler.state_dict() if self.scaler else None,
                "state": {"epoch": s.epoch, "step": s.step, "step_in_epoch": s.step_in_epoch, "elapsed": s.elapsed,
                          "images_seen": s.images_seen},
                "rng": ckpt.rng_state(), **extra,
            })
        if self.sharded:
            distributed.barrier(self.dist)
            ckpt.remove_stale_head_shards(folder, self.dist.rank, self.dist.world_size, s.step)

    def _save_model(self) -> None:
        if self.dist.is_main:
            embedder = self.ema.module.embedder if self.ema else self.face_model.embedder
            ckpt.save_model_file(self.out / "model.pt", embedder, self.meta)

    def _check_resume_world(self, path: Path) -> None:
        """A sharded head resumes at the world size it was saved with (checked before anything else)."""
        saved = (ckpt.load(path).get("head_parallel") or {}).get("world_size")
        if saved is not None and not self.sharded:
            raise ParameterError("resume", True, f"{path} holds a sharded head (loss.head_parallel=True); resume with it on")
        if self.sharded and saved is None:
            raise ParameterError("loss.head_parallel", True, f"{path} holds a replicated head; resume without it")
        if saved is not None and saved != self.dist.world_size:
            raise ParameterError("resume", True, f"the run's sharded head was saved by {saved} processes; resume it with "
                                f"torchrun --nproc_per_node {saved} (this run has {self.dist.world_size})")

    def _load(self, path: Path) -> None:
        payload = ckpt.load(path)
        if payload.get("classes") != self.classes:
            raise ParameterError("resume", True, f"the identities in data.root={self.cfg.data.root} differ from the run's "
                                f"({len(self.classes)} vs {len(payload.get('classes') or [])})")
        rng = payload["rng"]
        if self.sharded:
            hp = payload["head_parallel"]
            shard = ckpt.load(ckpt.head_shard_path(path.parent, self.dist.rank, hp["world_size"], hp["step"]))
            payload["model"], payload["optimizer"], payload["ema_full"] = sharded_state.merge(payload, shard)
            rng = shard["rng"]  # each rank's own stream (dropout, augmentation)
        self.face_model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        if self.ema is not None and payload.get("ema_full"):
            self.ema.load_state_dict(payload["ema_full"])
        if self.scaler is not None and payload.get("scaler"):
            self.scaler.load_state_dict(payload["scaler"])
        st = payload["state"]
        self.state = RunState(st["epoch"], st["step"], st["step_in_epoch"], st["elapsed"], st["images_seen"])
        ckpt.set_rng_state(rng)
        self.log(f"resumed from {path}: epoch {st['epoch']}, step {st['step']}")

    # ------------------------------------------------------------------ loop
    def progress_fraction(self) -> float:
        total = self.cfg.optim.epochs * self.steps_per_epoch
        frac = self.state.step / max(1, total)
        if self.cfg.time_budget > 0:
            frac = max(frac, self.state.elapsed / (60 * self.cfg.time_budget))
        return frac

    def budget_spent(self) -> bool:
        return self.cfg.time_budget > 0 and self.state.elapsed >= 60 * self.cfg.time_budget

    def train_step(self, x, y) -> tuple[float, float, int]:
        cfg = self.cfg
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        if self.device.type == "cuda" and cfg.optim.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        warmup_steps = int(round(cfg.optim.warmup_epochs * self.steps_per_epoch))
        lr = set_lr(self.optimizer, cfg.optim.lr,
                    lr_factor(self.state.step, warmup_steps, self.progress_fraction(), cfg.optim.min_lr_ratio))
        labels_b, lam = None, 1.0
        if self.mixer.enabled:
            x, y, labels_b, lam = self.mixer(x, y)
        self.model.train()
        if self.sharded:
            self.face_model.head.step = self.state.step  # seeds the class sampling (exact on resume)
        with self.autocast():
            out = self.model(x, y, labels_b, lam)
        loss = out.loss
        if not torch.isfinite(loss):
            raise FacefuseError(f"loss became {float(loss.detach())} at epoch {self.state.epoch + 1}, step {self.state.step}: "
                                "lower optim.lr=, raise optim.warmup_epochs= or keep optim.grad_clip= on")
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        if cfg.optim.grad_clip > 0 and self.sharded:
            head = self.face_model.head.weight
            clip_sharded_grad_norm([p for p in self.face_model.parameters() if p is not head], [head],
                                   cfg.optim.grad_clip)
        elif cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.face_model.parameters(), cfg.optim.grad_clip)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.ema is not None:
            self.ema.update_parameters(self.face_model)
        correct = int((out.preds == y).sum()) if out.preds is not None else 0
        return float(loss.detach()), lr, correct

    def run(self) -> dict:
        self.setup()
        with _Stop() as stop:
            try:
                summary = self._loop(stop)
            finally:
                distributed.shutdown(self.dist)
        return summary

    def _loop(self, stop: _Stop) -> dict:
        from tqdm import tqdm

        cfg, s = self.cfg, self.state
        n_params = count_parameters(self.face_model.embedder)
        self.log(f"training {cfg.model.backbone} ({n_params / 1e6:.2f}M params) with {cfg.loss.name}"
                 f"{' + ' + cfg.loss.pair_loss if cfg.loss.pair_loss else ''} on {len(self.classes)} identities, "
                 f"{len(self.train_set)} train / {len(self.val_set)} held-out images, device {self.device}, "
                 f"kernels {cfg.model.kernels}, {self.dist.world_size} process(es)")
        last_ckpt = time.monotonic()
        stopped_by = None
        while s.epoch < cfg.optim.epochs and stopped_by is None:
            self.sampler.set_epoch(s.epoch, s.step_in_epoch)
            bar = tqdm(self.train_loader, total=len(self.sampler), disable=not (self.progress and self.dist.is_main),
                       desc=f"epoch {s.epoch + 1}/{cfg.optim.epochs}", dynamic_ncols=True, leave=False)
            loss_sum = correct = seen = 0
            t0 = time.monotonic()
            for x, y in bar:
                t_step = time.monotonic()
                loss, lr, c = self.train_step(x, y)
                n = y.numel() * self.dist.world_size
                s.step += 1
                s.step_in_epoch += 1
                s.images_seen += n
                loss_sum += loss * y.numel()
                correct += c
                seen += y.numel()
                s.elapsed += time.monotonic() - t_step
                rate = seen * self.dist.world_size / max(1e-9, time.monotonic() - t0)
                bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}", lr=f"{lr:.2e}",
                                img_s=f"{rate:.0f}")
                if stop.signal is not None:
                    stopped_by = "signal"
                    break
                if self.budget_spent():
                    stopped_by = "time_budget"
                    break
                if cfg.checkpoint_minutes > 0 and time.monotonic() - last_ckpt > 60 * cfg.checkpoint_minutes:
                    self._save()
                    last_ckpt = time.monotonic()
            bar.close()
            epoch_done = s.step_in_epoch >= self.steps_per_epoch
            if stopped_by == "signal" and not epoch_done:
                self._save()
                self.log(f"stopped by signal at epoch {s.epoch + 1} step {s.step}; checkpoint saved, "
                         f"continue with --resume")
                raise KeyboardInterrupt
            if epoch_done or stopped_by == "time_budget":
                s.epoch += 1
                s.step_in_epoch = 0
                record = {"epoch": s.epoch, "step": s.step, "train_loss": loss_sum / max(1, seen),
                          "train_accuracy": correct / max(1, seen) if self.face_model.head is not None else None,
                          "lr": lr if seen else None, "images_per_s": seen * self.dist.world_size / max(1e-9, time.monotonic() - t0),
                          "elapsed_s": s.elapsed}
                if stopped_by is not None or s.epoch % cfg.eval_every == 0 or s.epoch == cfg.optim.epochs:
                    record.update(self.evaluate())
                if self.dist.is_main:
                    append_line(self.out / "metrics.jsonl", json.dumps(record))
                    self.log(_format_record(record))
                self._save()
                self._save_model()
                last_ckpt = time.monotonic()
                s.history.append(record)
            if stopped_by == "signal":
                raise KeyboardInterrupt
        return self._summary(stopped_by)

    def evaluate(self) -> dict:
        if not self.dist.is_main:
            return {}
        model = self.ema.module if self.ema else self.face_model
        out = {}
        # a sharded head needs every rank to classify: closed-set accuracy is left out with it
        acc = None if self.sharded else classification_accuracy(model, self.val_loader, self.device, self.autocast)
        if acc is not None:
            out["val_accuracy"] = acc
        if self.validator is not None:
            cfg = self.cfg
            m = self.validator.evaluate(model.embedder, image_size=cfg.model.image_size, mean=cfg.data.mean,
                                        std=cfg.data.std, device=self.device, autocast=self.autocast,
                                        num_workers=cfg.data.workers)
            out.update({f"pairs_{k}": v for k, v in m.items()})
        return out

    def _summary(self, stopped_by) -> dict:
        last = self.state.history[-1] if self.state.history else {}
        summary = {
            "run": str(self.out), "backbone": self.cfg.model.backbone, "loss": self.cfg.loss.name,
            "pair_loss": self.cfg.loss.pair_loss, "epochs_done": self.state.epoch, "steps": self.state.step,
            "train_seconds": round(self.state.elapsed, 1), "images_seen": self.state.images_seen,
            "images_per_s": self.state.images_seen / max(1e-9, self.state.elapsed),
            "parameters": count_parameters(self.face_model.embedder), "identities": len(self.classes),
            "train_images": len(self.train_set), "skipped_bad": len(self.skipped),
            "stopped_by": stopped_by or "epochs", "device": str(self.device),
            **{k: v for k, v in last.items() if k.startswith(("val_", "pairs_"))},
        }
        if self.dist.is_main:
            atomic_write_text(self.out / "summary.json", json.dumps(summary, indent=2))
        return summary


def _format_record(r: dict) -> str:
    parts = [f"epoch {r['epoch']}", f"loss {r['train_loss']:.4f}"]
    if r.get("train_accuracy") is not None:
        parts.append(f"train acc {r['train_accuracy']:.4f}")
    if "val_accuracy" in r:
        parts.append(f"val acc {r['val_accuracy']:.4f}")
    for k, label in (("pairs_roc_auc", "AUC"), ("pairs_eer", "EER"), ("pairs_kfold_accuracy", "pairs acc")):
        if k in r and isinstance(r[k], float) and math.isfinite(r[k]):
            parts.append(f"{label} {r[k]:.4f}")
    parts.append(f"{r['images_per_s']:.0f} img/s")
    return " | ".join(parts)


def train(cfg: TrainConfig, *, resume: bool = False, progress: bool = True, log=print) -> dict:
    return Trainer(cfg, resume=resume, progress=progress, log=log).run()
