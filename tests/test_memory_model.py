"""The head's memory model (trainer/memory_model.py) against one process per rank on CPU.

What is measured and why: the persistent terms (centres, their gradient, AdamW's m and v) are
counted exactly from the tensors each rank holds after a step (param, .grad, optimizer.state): RSS
cannot isolate them, since the first step also maps libraries and allocator pools. The transient
terms (logit blocks, centre copies, gathered embeddings) are measured as the rise of the process's
peak resident memory (VmHWM, reset through /proc/self/clear_refs) over the forward of step 2, with
glibc's mmap threshold fixed at 128 KiB (MALLOC_MMAP_THRESHOLD_) so every large tensor is its own
mapping, returned on free: RSS then follows the live tensor bytes."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from facefuse.trainer.memory_model import head_memory, table

C, D, B = 60_000, 32, 32  # a logit block of the 2-rank shard: 32 x 30000 fp32 = 3.8 MB

pytestmark = pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")


def _hwm() -> int:
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024


def _worker(rank, world, init, out):
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    from facefuse.trainer.losses import build_head
    from facefuse.trainer.sharded_head import ShardedMarginHead

    results = {}
    cases = [("replicated", 1.0)] if world == 1 else [("sharded", 1.0), ("sampled", 0.5)]
    for mode, rate in cases:
        g = torch.Generator().manual_seed(rank)
        x, y = torch.randn(B // world, D, generator=g, requires_grad=True), torch.randint(0, C, (B // world,), generator=g)
        head = (build_head("arcface", D, C, s=16.0) if mode == "replicated"
                else ShardedMarginHead.from_options("arcface", D, C, s=16.0, sample_rate=rate))
        opt = torch.optim.AdamW(head.parameters(), lr=1e-3)
        head(x, y).loss.backward()
        opt.step()
        static = sum(t.numel() * t.element_size() for p in head.parameters()
                     for t in [p, p.grad, *[v for v in opt.state[p].values() if v.dim() > 0]])
        open("/proc/self/clear_refs", "w").write("5")  # reset the peak to the current RSS
        before = _hwm()
        head.step = 1
        loss = head(x, y).loss
        results[mode] = (static, _hwm() - before)
        del loss, head, opt
    torch.save(results, f"{out}/rank{rank}.pt")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [1, 2])
def test_measured_memory_per_rank_agrees_with_the_model(world, monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")  # read by the spawned processes' glibc
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        torch.multiprocessing.spawn(_worker, args=(world, f"file://{tmp}/rdzv", tmp), nprocs=world)
        ranks = [torch.load(f"{tmp}/rank{r}.pt") for r in range(world)]
    for res in ranks:
        for mode, (static, transient) in res.items():
            m = head_memory(C, D, world, B // world, mode=mode, sample_rate=0.5)
            assert static == m["centres"] + m["gradient"] + m["adamw"], mode
            model = m["logits"] + m["centre_copies"] + m["gathered"]
            assert abs(transient - model) < 0.1 * model, (mode, transient, model)


def test_model_terms_and_table():
    rep = head_memory(10**6, 512, 8, 128, mode="replicated")
    sh = head_memory(10**6, 512, 8, 128, mode="sharded")
    fused = head_memory(10**6, 512, 8, 128, mode="sharded", fused=True)
    assert rep["centres"] == 8 * sh["centres"] == 2_048_000_000 and fused["logits"] == 0
    assert sh["logits"] == 4 * 1024 * 125_000 * 4 and sh["gathered"] == 1024 * 512 * 4
    assert head_memory(7, 2, 3, 1)["centres"] == 3 * 2 * 4  # ceil(7 / 3) classes on the largest rank
    text = table()
    assert len(text.splitlines()) == 2 + 15 and "| 10^7 | replicated |" in text and "*" in text
