"""The model-parallel margin head (trainer/sharded_head.py) against the replicated MarginHead on one
process: loss, gradients of every shard of W and of every rank's embeddings, predictions. Two and
three gloo processes (torch.multiprocessing.spawn), float64, class counts that do not divide by the
world size; class sampling keeps every positive and r = 1 is the full head. The fused-kernel path
(``kernel_backend="triton"``: per-row shard partials, no B x C/N logits) runs the same cases in
float32 under the Triton interpreter and must match the float64 full head to float32 tolerance."""

from __future__ import annotations

import itertools
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from facefuse.kernels.margin import target_logit
from facefuse.trainer.distributed import gather_rows
from facefuse.trainer.losses import build_head
from facefuse.trainer.sharded_head import ShardedMarginHead, clip_grad_norm, init_centres, shard_range

B_LOCAL, DIM = 5, 6
CASES = {  # name: (head, options, classes, sample_rate)
    "arcface": ("arcface", {"margin": 0.5}, 7, 1.0),
    "cosface": ("cosface", {"margin": 0.35}, 11, 1.0),
    "sphereface": ("sphereface", {"margin": 1.7}, 7, 1.0),
    "label-smoothing": ("arcface", {"label_smoothing": 0.1}, 13, 1.0),
    "combined-easy": ("combined", {"m1": 1.2, "m2": 0.3, "m3": 0.1, "easy_margin": True}, 8, 1.0),
    "normface": ("normface", {}, 7, 1.0),
    "sampled": ("arcface", {"label_smoothing": 0.1}, 29, 0.3),
}
SCALE = 8.0
# the fused path runs on CPU tensors under the Triton interpreter only (gloo moves CPU tensors; on a
# GPU machine the interpreter is off and the kernels need CUDA tensors: skipped there)
BACKENDS = ("torch", "triton") if os.environ.get("TRITON_INTERPRET") == "1" else ("torch",)
ALL_BACKENDS = ("torch", "triton")
TOL = {"torch": {"rtol": 1e-10, "atol": 1e-12}, "triton": {"rtol": 2e-4, "atol": 2e-6}}


def _batch(world: int, classes: int):
    g = torch.Generator().manual_seed(classes * 10 + world)
    x = torch.randn(world * B_LOCAL, DIM, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (world * B_LOCAL,), generator=g)
    return x, y


def _worker(rank: int, world: int, init: str, out: str):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    results = {}
    for (case, (name, opts, classes, rate)), backend in itertools.product(CASES.items(), BACKENDS):
        x, y = _batch(world, classes)
        rows = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
        dtype = torch.float64 if backend == "torch" else torch.float32  # the kernels take fp32/bf16/fp16
        xl = x[rows].to(dtype).requires_grad_(True)
        head = ShardedMarginHead.from_options(name, DIM, classes, s=SCALE, sample_rate=rate, seed=3,
                                              kernel_backend=backend, **opts)
        head.embedding_grad_scale = 1.0  # no DDP here: each rank gets its rows' exact gradient
        head.to(dtype)
        head.step = 7
        out_ = head(xl, y[rows])
        out_.loss.backward()
        kept = head.sampled_classes((y - head.start)[(y >= head.start) & (y < head.stop)] - 0)
        results[case + ("" if backend == "torch" else "/triton")] = {
            "loss": out_.loss.detach(), "dx": xl.grad, "dw": head.weight.grad, "w": head.weight.detach(),
            "preds": out_.preds, "range": (head.start, head.stop), "kept": None if kept is None else kept + head.start}
    # gather_rows: every rank gets the sum over ranks of its rows' gradient (times grad_scale)
    v = torch.arange(B_LOCAL * DIM, dtype=torch.float64).reshape(B_LOCAL, DIM).add(rank).requires_grad_(True)
    (gather_rows(v, 2.0) * (torch.arange(world * B_LOCAL, dtype=torch.float64) + 1).unsqueeze(1)).sum().backward()
    results["gather_grad"] = v.grad
    # clipping by the global norm over the shards
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.full((3,), float(rank + 1))
    q = torch.nn.Parameter(torch.zeros(2))
    q.grad = torch.ones(2)
    results["clip"] = (clip_grad_norm([q], [p], 1.0), p.grad.clone(), q.grad.clone())
    torch.save(results, f"{out}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module", params=[2, 3], ids=["2proc", "3proc"])
def sharded(request):
    world = request.param
    with tempfile.TemporaryDirectory() as tmp:
        torch.multiprocessing.spawn(_worker, args=(world, f"file://{tmp}/rdzv", tmp), nprocs=world)
        yield world, [torch.load(f"{tmp}/rank{r}.pt") for r in range(world)]


def _full_head(name, opts, classes, world):
    head = build_head(name, DIM, classes, s=SCALE, **opts).double()
    with torch.no_grad():
        head.weight.copy_(init_centres(0, classes, DIM, 3))
    x, y = _batch(world, classes)
    x.requires_grad_(True)
    out = head(x, y)
    out.loss.backward()
    return head, x, y, out


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("case", [c for c in CASES if CASES[c][3] == 1.0])
def test_sharded_equals_full_head(sharded, case, backend):
    if backend not in BACKENDS:
        pytest.skip("the fused path on CPU tensors needs the Triton interpreter")
    world, results = sharded
    name, opts, classes, _ = CASES[case]
    head, x, _, out = _full_head(name, opts, classes, world)
    key, tol = case + ("" if backend == "torch" else "/triton"), TOL[backend]
    ranges = [r[key]["range"] for r in results]
    assert ranges == [shard_range(classes, world, r) for r in range(world)]
    assert ranges[0][0] == 0 and ranges[-1][1] == classes and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    torch.testing.assert_close(torch.cat([r[key]["w"] for r in results]).double(), head.weight.detach(), **tol)
    for r, res in enumerate(r[key] for r in results):
        torch.testing.assert_close(res["loss"].double(), out.loss.detach(), **tol)
        torch.testing.assert_close(res["dx"].double(), x.grad[r * B_LOCAL:(r + 1) * B_LOCAL], **tol)
        lo, hi = res["range"]
        torch.testing.assert_close(res["dw"].double(), head.weight.grad[lo:hi], **tol)
        assert torch.equal(res["preds"], out.preds[r * B_LOCAL:(r + 1) * B_LOCAL])


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_sampling_keeps_every_positive_and_is_the_softmax_over_kept_classes(sharded, backend):
    if backend not in BACKENDS:
        pytest.skip("the fused path on CPU tensors needs the Triton interpreter")
    world, results = sharded
    _, opts, classes, rate = CASES["sampled"]
    key, tol = "sampled" + ("" if backend == "torch" else "/triton"), TOL[backend]
    x, y = _batch(world, classes)
    kept = torch.cat([r[key]["kept"] for r in results])
    assert set(y.tolist()) <= set(kept.tolist())  # every positive of the global batch
    for res in (r[key] for r in results):
        lo, hi = res["range"]
        positives = set(y[(y >= lo) & (y < hi)].tolist())
        assert len(res["kept"]) == max(1, int(rate * (hi - lo)), len(positives)) < hi - lo
    # oracle written out: cross-entropy with label smoothing over the kept columns only
    w = init_centres(0, classes, DIM, 3).double()[kept].requires_grad_(True)
    xr = x.clone().requires_grad_(True)
    cos = F.normalize(xr, dim=1) @ F.normalize(w, dim=1).T
    col = (kept.unsqueeze(0) == y.unsqueeze(1)).long().argmax(1)
    phi = target_logit(cos.gather(1, col.unsqueeze(1)), 1.0, 0.5, 0.0)
    z = SCALE * cos.scatter(1, col.unsqueeze(1), phi)
    eps = opts["label_smoothing"]
    loss = (torch.logsumexp(z, 1) - (1 - eps) * z.gather(1, col.unsqueeze(1)).squeeze(1) - eps * z.mean(1)).mean()
    loss.backward()
    for r, res in enumerate(r[key] for r in results):
        torch.testing.assert_close(res["loss"].double(), loss.detach(), **tol)
        torch.testing.assert_close(res["dx"].double(), xr.grad[r * B_LOCAL:(r + 1) * B_LOCAL], **tol)
        lo, hi = res["range"]
        mine = (kept >= lo) & (kept < hi)
        dw = res["dw"].double()
        torch.testing.assert_close(dw[kept[mine] - lo], w.grad[mine], **tol)
        dropped = torch.ones(hi - lo, dtype=torch.bool)
        dropped[kept[mine] - lo] = False
        assert torch.all(dw[dropped] == 0)


def test_gather_rows_gradient_and_global_clip(sharded):
    world, results = sharded
    for r, res in enumerate(results):
        # d/dv_r of sum_k (k+1) * gathered_k, on each of `world` ranks, summed, times 2
        weights = torch.arange(r * B_LOCAL, (r + 1) * B_LOCAL, dtype=torch.float64) + 1
        torch.testing.assert_close(res["gather_grad"], 2.0 * world * weights.unsqueeze(1).expand(B_LOCAL, DIM))
        total = (2.0 + sum(3.0 * (k + 1) ** 2 for k in range(world))) ** 0.5
        norm, pg, qg = res["clip"]
        assert abs(float(norm) - total) < 1e-5
        torch.testing.assert_close(pg, torch.full((3,), (r + 1) / (total + 1e-6)))
        torch.testing.assert_close(qg, torch.full((2,), 1 / (total + 1e-6)))


def test_sampling_is_seeded_by_seed_step_rank():
    head = ShardedMarginHead(4, 50, m1=1.0, m2=0.5, m3=0.0, easy_margin=False, s=8.0, label_smoothing=0.0,
                             sample_rate=0.2, seed=1, rank=0, world_size=1)
    pos = torch.tensor([3, 40, 3])
    head.step = 5
    a = head.sampled_classes(pos)
    assert torch.equal(a, head.sampled_classes(pos)) and {3, 40} <= set(a.tolist()) and len(a) == 10
    head.step = 6
    assert not torch.equal(a, head.sampled_classes(pos))
    assert ShardedMarginHead(4, 50, m1=1.0, m2=0.0, m3=0.0, easy_margin=False, s=8.0, label_smoothing=0.0,
                             rank=0, world_size=1).sampled_classes(pos) is None  # r = 1: every class


def test_centres_do_not_depend_on_the_world_size():
    full = init_centres(0, 10000, 3, 0)
    for world in (2, 3, 7):
        parts = [init_centres(*shard_range(10000, world, r), 3, 0) for r in range(world)]
        assert torch.equal(torch.cat(parts), full)
