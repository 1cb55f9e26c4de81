r"""Model-parallel margin head (insightface's Partial FC, with exact gradients).

With N processes, rank r owns the contiguous class shard ``[start_r, stop_r)`` (:func:`shard_range`;
the first ``C mod N`` ranks hold one class more) of the centres W, and their optimiser state.
One step, for the global batch X (B x D, all-gathered with autograd) and its labels y::

    z_ij   = s*cos_ij                for the shard's classes j,  target j = y_i replaced by
    z_iy   = s*phi(cos_iy)           on the rank that owns y_i only (phi: kernels.margin.target_logit)
    M_i    = max_ranks max_j z_ij                       (all-reduce MAX)
    lse_i  = M_i + log sum_ranks sum_j exp(z_ij - M_i)  (all-reduce SUM)
    loss   = mean_i [lse_i - (1 - eps) z_iy - (eps / C) sum_ranks sum_j z_ij]

which is the unsharded head's ``F.cross_entropy(z, y, label_smoothing=eps)`` term by term.
Backward needs no communication beyond the embeddings' gather: rank r's logits get
``dL/dz_ij = (exp(z_ij - lse_i) - (1 - eps)[j = y_i] - eps / C) / B`` (:class:`ShardedCrossEntropy`),
autograd carries it through the margin and the normalisation to W_r and to X, and the gather's
backward sums the ranks' parts of dL/dX (:func:`trainer.distributed.gather_rows`), times N to undo
DDP's mean over ranks for the backbone. W_r is kept out of DDP (nothing to all-reduce).

Class sampling (``sample_rate`` r < 1): each step each rank keeps every class of its shard that is
a label in the global batch, plus random others up to ``max(1, int(r * C_r))`` classes, drawn from a
generator seeded by ``(seed, step, rank)`` (resume replays it). The softmax then runs over the kept
classes of all ranks (C in the label-smoothing term is their count); r = 1 is the full head exactly.

Fused kernel (``kernel_backend="triton"``: CUDA, or the Triton interpreter on CPU): no rank holds
its B x C/N logits. :func:`kernels.margin_ce.margin_ce_shard_forward` returns per row of the shard
the max m_r of z, l_r = sum_j exp(z_ij - m_r), the target logit (0 where not owned), the sum of z
and the best cosine; the same two all-reduces give ``lse`` (l_r is rescaled by exp(m_r - M) first),
and :func:`kernels.margin_ce.margin_ce_shard_backward` computes this shard's dx share and dW_r from
the global ``lse`` in one tiled pass (:class:`FusedShardCrossEntropy`).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from facefuse.core.errors import ParameterError
from facefuse.kernels.margin import target_logit
from facefuse.trainer.distributed import gather_labels, gather_rows
from facefuse.trainer.losses.margin import HeadOutput, MarginHead, _check_batch, _compute_dtype, build_head
from facefuse.trainer.ops import check_backend, cosine_logits
from facefuse.trainer.sampler import _mix

INIT_BLOCK = 4096  # centres are initialised in blocks of this many classes, each from its own seed


def shard_range(num_classes: int, world_size: int, rank: int) -> tuple[int, int]:
    """``[start, stop)`` of rank's classes: contiguous, sizes differ by at most one."""
    base, extra = divmod(num_classes, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def init_centres(start: int, stop: int, dim: int, seed: int) -> torch.Tensor:
    """N(0, 0.01) rows ``start..stop-1`` of the C x D centres; row j is the same whatever the world
    size (block j // INIT_BLOCK has its own generator), so a run's start does not depend on N."""
    rows = []
    for block in range(start // INIT_BLOCK, -(-stop // INIT_BLOCK)):
        g = torch.Generator().manual_seed(_mix("head-init", seed, block))
        w = torch.randn(INIT_BLOCK, dim, generator=g) * 0.01
        lo, hi = max(start, block * INIT_BLOCK), min(stop, (block + 1) * INIT_BLOCK)
        rows.append(w[lo - block * INIT_BLOCK:hi - block * INIT_BLOCK])
    return torch.cat(rows) if rows else torch.empty(0, dim)


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce(t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if _world()[1] > 1:
        dist.all_reduce(t, op=op)
    return t


class ShardedCrossEntropy(torch.autograd.Function):
    """Mean softmax cross-entropy (label smoothing ``eps``) over logits split by columns across
    ranks. ``z`` is this rank's B x C_r block (target logits already margin-adjusted), ``target``
    the column of row i's label in this block or -1 when another rank owns it, ``num_classes`` the
    total column count. Forward: two all-reduces of O(B) partials; backward: local only."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, target: torch.Tensor, num_classes: float, eps: float) -> torch.Tensor:
        owned = target >= 0
        row_max = z.max(dim=1).values if z.shape[1] else z.new_full((z.shape[0],), -math.inf)
        m = _all_reduce(row_max.clone(), dist.ReduceOp.MAX)
        z_target = torch.where(owned, z.gather(1, target.clamp_min(0).unsqueeze(1)).squeeze(1), 0.0)
        stats = _all_reduce(torch.stack([torch.exp(z - m.unsqueeze(1)).sum(1), z_target, z.sum(1)]))
        lse = m + torch.log(stats[0])
        ctx.save_for_backward(z, target, lse)
        ctx.num_classes, ctx.eps = num_classes, eps
        return (lse - (1 - eps) * stats[1] - (eps / num_classes) * stats[2]).mean()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        z, target, lse = ctx.saved_tensors
        dz = torch.exp(z - lse.unsqueeze(1)) - ctx.eps / ctx.num_classes
        rows = (target >= 0).nonzero().squeeze(1)
        dz[rows, target[rows]] -= 1 - ctx.eps
        return dz * (grad / z.shape[0]), None, None, None


class FusedShardCrossEntropy(torch.autograd.Function):
    """The same loss as :class:`ShardedCrossEntropy` (margins included) from the fused kernel's
    per-row shard partials: returns ``(loss, best cos, its local column)``; gradients for ``x``
    (this shard's share) and ``w``. ``hyper`` = (s, m1, m2, m3, easy_margin, eps)."""

    @staticmethod
    def forward(ctx, x, w, target, hyper, num_classes):
        from facefuse.kernels.margin_ce import margin_ce_shard_forward

        s, m1, m2, m3, easy_margin, eps = hyper
        p = margin_ce_shard_forward(x, w, target, s=s, m1=m1, m2=m2, m3=m3, easy_margin=easy_margin)
        m = _all_reduce(p.m.clone(), dist.ReduceOp.MAX)
        stats = _all_reduce(torch.stack([p.l * torch.exp(p.m - m), p.zt, p.zsum]))
        lse = m + torch.log(stats[0])
        ctx.save_for_backward(x, w, lse)
        ctx.partials, ctx.hyper, ctx.num_classes = p, hyper, num_classes
        ctx.mark_non_differentiable(p.best, p.column)
        loss = (lse - (1 - eps) * stats[1] - (eps / num_classes) * stats[2]).mean()
        return loss, p.best, p.column

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad, _g_best, _g_column):
        from facefuse.kernels.margin_ce import margin_ce_shard_backward

        x, w, lse = ctx.saved_tensors
        s, eps = ctx.hyper[0], ctx.hyper[-1]
        g = (grad.float() / x.shape[0]).expand(x.shape[0]).contiguous()
        dx, dw = margin_ce_shard_backward(x, w, ctx.partials, lse, g, s=s, label_smoothing=eps,
                                          num_classes=ctx.num_classes, need_dx=ctx.needs_input_grad[0],
                                          need_dw=ctx.needs_input_grad[1])
        return dx, dw, None, None, None


class ShardedMarginHead(nn.Module):
    """This rank's shard of a :class:`~trainer.losses.margin.MarginHead` (same margins, scale and
    label smoothing); ``forward(emb, labels)`` takes the local batch and returns the global loss
    and the local rows' predictions (argmax of cos over every rank's classes; with sampling over
    the kept ones)."""

    def __init__(self, embedding_dim: int, num_classes: int, *, m1: float, m2: float, m3: float,
                 easy_margin: bool, s: float, label_smoothing: float, sample_rate: float = 1.0, seed: int = 0,
                 rank: int | None = None, world_size: int | None = None, kernel_backend: str = "torch",
                 embedding_grad_scale: float | None = None):
        super().__init__()
        r, n = _world()
        self.rank, self.world_size = r if rank is None else rank, n if world_size is None else world_size
        if num_classes < self.world_size:
            raise ValueError(f"{num_classes} identities cannot be sharded over {self.world_size} processes")
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        self.embedding_dim, self.num_classes = embedding_dim, num_classes
        self.start, self.stop = shard_range(num_classes, self.world_size, self.rank)
        self.m1, self.m2, self.m3, self.easy_margin = m1, m2, m3, easy_margin
        self.s, self.label_smoothing, self.sample_rate, self.seed = s, label_smoothing, sample_rate, seed
        self.kernel_backend = check_backend(kernel_backend)
        # N: each rank's backward holds only its classes' part of dL/dX; DDP then averages over ranks
        self.embedding_grad_scale = float(self.world_size if embedding_grad_scale is None else embedding_grad_scale)
        self.step = 0  # the optimiser step, set by the trainer: seeds the class sampling
        self.weight = nn.Parameter(init_centres(self.start, self.stop, embedding_dim, seed))

    @classmethod
    def from_options(cls, name: str, embedding_dim: int, num_classes: int, *, sample_rate: float = 1.0,
                     seed: int = 0, **head_options) -> "ShardedMarginHead":
        """The shard of head ``name`` of :data:`HEADS` built with :func:`build_head`'s options: the
        margins are resolved (and checked) by the replicated head class itself."""
        with torch.random.fork_rng(devices=[]):
            ref = build_head(name, embedding_dim, 1, **head_options)
        if not isinstance(ref, MarginHead):
            raise ParameterError("loss.head_parallel", True, f"needs a margin head (arcface, cosface, sphereface, normface, "
                             f"combined), not {name!r}")
        return cls(embedding_dim, num_classes, m1=ref.m1, m2=ref.m2, m3=ref.m3, easy_margin=ref.easy_margin,
                   s=ref.s, label_smoothing=ref.label_smoothing, sample_rate=sample_rate, seed=seed,
                   kernel_backend=ref.kernel_backend)

    def sampled_classes(self, positives: torch.Tensor) -> torch.Tensor | None:
        """Sorted local columns kept this step (None: all): every positive, plus random others up to
        ``max(1, int(sample_rate * C_r))``, seeded by ``(seed, step, rank)``."""
        if self.sample_rate >= 1:
            return None
        local = self.stop - self.start
        g = torch.Generator().manual_seed(_mix("class-sample", self.seed, self.step, self.rank))
        score = torch.rand(local, generator=g)
        positives = positives.unique().cpu()
        score[positives] = 2.0  # above every random score: kept first
        keep = max(max(1, int(self.sample_rate * local)), len(positives))
        return score.topk(keep).indices.sort().values.to(self.weight.device)

    def shard_logits(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """cos between the gathered embeddings and this shard's (kept) centres, B x C_r (the torch
        path; the fused kernel never forms it)."""
        return cosine_logits(x, w)

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> HeadOutput:
        _check_batch(emb, labels, self.embedding_dim)
        x = gather_rows(emb, self.embedding_grad_scale)
        y = gather_labels(labels)
        local = y - self.start
        owned = (local >= 0) & (local < self.stop - self.start)
        index = self.sampled_classes(local[owned])
        w = self.weight if index is None else self.weight[index]
        column = torch.arange(self.stop - self.start, device=y.device)
        if index is not None:  # local class -> its column among the kept ones
            column = torch.full_like(column, -1).index_put_((index,), torch.arange(len(index), device=y.device))
        target = torch.where(owned, column[local.clamp(0, self.stop - self.start - 1)], -1)
        kept = float(_all_reduce(torch.tensor(float(w.shape[0]), dtype=torch.float64, device=w.device)))
        lo = self.rank * emb.shape[0] if x.shape[0] > emb.shape[0] else 0
        if self.kernel_backend == "triton":
            w = w if w.dtype in (x.dtype, torch.float32) else w.to(x.dtype)
            hyper = (self.s, self.m1, self.m2, self.m3, self.easy_margin, self.label_smoothing)
            loss, best, col = FusedShardCrossEntropy.apply(x, w, target, hyper, kept)
            preds = self._global_argmax(best, col, index)
            return HeadOutput(loss, preds[lo:lo + emb.shape[0]])
        cos = self.shard_logits(x, w)
        cos = cos.to(_compute_dtype(cos.dtype))
        rows = owned.nonzero().squeeze(1)
        phi = target_logit(cos[rows, target[rows]], self.m1, self.m2, self.m3, self.easy_margin)
        z = (self.s * cos).index_put((rows, target[rows]), self.s * phi)
        loss = ShardedCrossEntropy.apply(z, target, kept, self.label_smoothing)
        preds = self._global_argmax(*cos.detach().max(dim=1), index)
        return HeadOutput(loss, preds[lo:lo + emb.shape[0]])

    def _global_argmax(self, best: torch.Tensor, col: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
        """Class of the largest cos over every rank's (kept) classes, from each rank's best value
        and its local column; ties go to the lower class."""
        cls = self.start + (col if index is None else index[col])
        if self.world_size == 1 or not dist.is_initialized():
            return cls
        vals, ids = gather_labels(best.unsqueeze(0)), gather_labels(cls.unsqueeze(0))  # N x B each
        return ids.gather(0, vals.argmax(dim=0, keepdim=True)).squeeze(0)

    def extra_repr(self) -> str:
        return (f"{self.embedding_dim} -> classes [{self.start}, {self.stop}) of {self.num_classes} "
                f"(rank {self.rank}/{self.world_size}), s={self.s}, margins={(self.m1, self.m2, self.m3)}, "
                f"easy_margin={self.easy_margin}, label_smoothing={self.label_smoothing}, "
                f"sample_rate={self.sample_rate}")


def clip_grad_norm(replicated, sharded, max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over the replicated parameters and every rank's shard:
    the squared norm of the shards is all-reduced, so every rank clips by the same global norm."""
    rep = [p.grad for p in replicated if p.grad is not None]
    shard = [p.grad for p in sharded if p.grad is not None]
    device = (rep + shard)[0].device
    sq = lambda gs: sum((g.detach().float().pow(2).sum() for g in gs), torch.zeros((), device=device))  # noqa: E731
    total = (sq(rep) + _all_reduce(sq(shard))).sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in rep + shard:
        g.detach().mul_(coef.to(g.device, g.dtype))
    return total
