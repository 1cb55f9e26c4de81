"""torchrun support: the same code path for one process and for N (gloo on CPU, NCCL on CUDA)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init(device_type: str) -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    info = DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    if device_type == "cuda":
        torch.cuda.set_device(info.local_rank)
    return info


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(t)
    return t


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


class GlobalBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics cover the global batch of all processes.

    ``nn.SyncBatchNorm`` only runs on CUDA; this one all-reduces (sum, sum of squares, count) with a
    differentiable all-reduce, so it also works with gloo on CPU and gives the same step as one
    process on the global batch. Used on CPU; CUDA uses the native SyncBatchNorm."""

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {x.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        dims = [0, *range(2, x.dim())]
        count = x.new_tensor([x.numel() / x.shape[1]], dtype=torch.float32)
        xf = x.float()
        stats = torch.cat([xf.sum(dims), (xf * xf).sum(dims), count])
        stats = all_reduce(stats)
        c = x.shape[1]
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean * mean).clamp_min(0)
        with torch.no_grad():
            self.num_batches_tracked += 1
            m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            self.running_mean.mul_(1 - m).add_(m * mean)
            self.running_var.mul_(1 - m).add_(m * var * n / (n - 1).clamp_min(1))
        shape = [1, c] + [1] * (x.dim() - 2)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert_batchnorm(module: torch.nn.Module, device_type: str) -> torch.nn.Module:
    """Swap every BatchNorm for its cross-process version (SyncBatchNorm on CUDA)."""
    if device_type == "cuda":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
    out = module
    if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        out = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats)
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        out.running_mean, out.running_var = module.running_mean, module.running_var
        out.num_batches_tracked = module.num_batches_tracked
    for name, child in module.named_children():
        out.add_module(name, convert_batchnorm(child, device_type))
    return out


class _GatherRows(torch.autograd.Function):
    """All-gather of equal-sized row blocks with a gradient: rank r gets back the sum over ranks
    of the gradients of its own rows, times ``grad_scale``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, grad_scale: float) -> torch.Tensor:
        ctx.rank, ctx.rows, ctx.grad_scale = dist.get_rank(), x.shape[0], grad_scale
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad)  # gloo has no reduce_scatter; the B x D gradient is small
        mine = grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]
        return mine * ctx.grad_scale if ctx.grad_scale != 1 else mine.clone(), None


def gather_rows(x: torch.Tensor, grad_scale: float = 1.0) -> torch.Tensor:
    """``cat`` of every rank's ``x`` (same shape on all ranks), in rank order, differentiable.

    Backward gives rank r ``grad_scale * sum_ranks dL_rank/dx_r``.  When every rank computes the
    same loss from the gathered rows (a pair loss on the global batch) that sum is already N times
    the gradient, which DDP's mean over ranks turns back into the gradient: ``grad_scale=1``.
    When each rank contributes only its part (a sharded head: its classes' terms), the sum is the
    gradient itself and ``grad_scale=N`` undoes DDP's mean (as insightface's Partial FC does).
    Without a process group it returns ``x``."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return _GatherRows.apply(x, float(grad_scale))


def gather_labels(y: torch.Tensor) -> torch.Tensor:
    """All-gather of a tensor without gradient (labels), in rank order."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return y
    parts = [torch.empty_like(y) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, y.contiguous())
    return torch.cat(parts)
