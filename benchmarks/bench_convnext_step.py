"""Benchmark one ConvNeXt-T training step at 112 px with the Triton kernels on vs off (GPU).

Step: channels_last images -> ConvNeXt-T trunk (``trainer.backbones.build_backbone``) -> global
average pool -> Linear to a 512-d embedding -> margin cross-entropy (ArcFace, s=64, m=0.5) over 8631
classes -> backward -> AdamW. bf16 autocast. "triton" routes the depthwise convolutions and the loss
through kernels/ (``kernel_backend="triton"``, ``trainer.ops.margin_cross_entropy(backend="triton")``);
"torch" uses F.conv2d and the loss reference. Reports images/s from the median step time.

    python benchmarks/bench_convnext_step.py [--batch 128] [--classes 8631]

Writes benchmarks/results/convnext_step-<device>.json.
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import device_name, print_table, write_results  # noqa: E402

BACKENDS = ("torch", "triton")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--classes", type=int, default=8631)
    p.add_argument("--embedding-dim", type=int, default=512)
    p.add_argument("--warmup", type=int, default=200, help="do_bench warmup (ms)")
    p.add_argument("--rep", type=int, default=2000, help="do_bench repetition time (ms)")
    return p.parse_args(argv)


def make_step(backend: str, args, device):
    """Model, head, optimiser and batch for one backend; returns the step closure."""
    import torch

    from facefuse.trainer import ops
    from facefuse.trainer.backbones import build_backbone

    torch.manual_seed(0)
    trunk = build_backbone("convnext_t", kernel_backend=backend).to(device).to(memory_format=torch.channels_last)
    embed = torch.nn.Linear(trunk.num_features, args.embedding_dim).to(device)
    classes = torch.nn.Parameter(torch.randn(args.classes, args.embedding_dim, device=device) * 0.01)
    params = [*trunk.parameters(), *embed.parameters(), classes]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05)
    images = torch.randn(args.batch, 3, args.size, args.size, device=device).contiguous(
        memory_format=torch.channels_last)
    labels = torch.randint(0, args.classes, (args.batch,), device=device)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            emb = embed(trunk(images).mean(dim=(2, 3)))
            # fp32 master class weights as they are: the fused kernel casts its tiles to the bf16
            # embeddings' dtype on load (no C x D bf16 copy), the reference computes in fp32
            loss = ops.margin_cross_entropy(emb, classes, labels, s=64.0, m1=1.0, m2=0.5, m3=0.0,
                                            backend=backend)
        loss.backward()
        opt.step()
        return loss

    return step


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("bench_convnext_step: CUDA is required (it times GPU training steps); nothing measured or written.")
        return 0
    from facefuse.kernels._common import INTERPRETING

    if INTERPRETING:
        print("bench_convnext_step: unset TRITON_INTERPRET to benchmark compiled kernels.")
        return 2
    try:
        import facefuse.trainer.backbones  # noqa: F401
    except ImportError as exc:
        print(f"bench_convnext_step: trainer.backbones is not importable ({exc}); cannot build ConvNeXt-T.")
        return 1
    from triton.testing import do_bench

    device = torch.device("cuda")
    rows = []
    for backend in BACKENDS:
        step = make_step(backend, args, device)
        loss0 = float(step())  # first step: autotune / cudnn choice outside the timing
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        ms = do_bench(step, warmup=args.warmup, rep=args.rep, return_mode="median")
        rows.append({"backend": backend, "step_ms": ms, "images_per_s": args.batch / (ms * 1e-3),
                     "peak_mib": torch.cuda.max_memory_allocated() / 2**20, "first_loss": loss0})
        print(f"{backend}: {ms:.2f} ms/step, {rows[-1]['images_per_s']:.1f} images/s", flush=True)
        del step
        gc.collect()
        torch.cuda.empty_cache()
    base = rows[0]["step_ms"]
    for r in rows:
        r["speedup_vs_torch"] = base / r["step_ms"]

    print_table(rows, ["backend", "step_ms", "images_per_s", "speedup_vs_torch", "peak_mib", "first_loss"])
    settings = dict(model="convnext_t", batch=args.batch, size=args.size, classes=args.classes,
                    embedding_dim=args.embedding_dim, loss="arcface s=64 m=0.5", autocast="bfloat16",
                    layout="channels_last", optimizer="AdamW(lr=1e-3, wd=0.05)", warmup_ms=args.warmup,
                    rep_ms=args.rep, timing="triton.testing.do_bench median of whole steps")
    path = write_results("convnext_step", device_name(), settings, rows)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
