"""Benchmark the Triton depthwise 7x7 convolution against cuDNN and torch.compile (GPU).

ConvNeXt-T stage shapes for 112x112 faces (28x28x96, 14x14x192, 7x7x384, 3x3x768) at batch 256,
channels_last. For each pass (fwd, bwd, fwd+bwd): median time and achieved GB/s against the bytes
the pass must move at least (fwd: read x, write y; bwd: read dy and x, write dx; fwd+bwd: both; the
7x7 weights are negligible). bwd includes the weight and bias gradients.

    python benchmarks/bench_dwconv.py
    python benchmarks/bench_dwconv.py --batch 128 --dtype float16

Writes benchmarks/results/dwconv-<device>.json.
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import device_name, print_table, write_results  # noqa: E402

SHAPES = [(28, 28, 96), (14, 14, 192), (7, 7, 384), (3, 3, 768)]  # (H, W, C) at 112 px
MODES = ("fwd", "bwd", "fwd+bwd")
BYTES_FACTOR = {"fwd": 2, "bwd": 3, "fwd+bwd": 5}  # multiples of x's size in bytes
PROVIDERS = ("triton", "triton_fused", "cudnn", "compile")  # triton: split backward; _fused: one pass


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warmup (ms)")
    p.add_argument("--rep", type=int, default=200, help="do_bench repetition time (ms)")
    p.add_argument("--bwd-reps", type=int, default=50, help="timed backward passes (each after a forward)")
    return p.parse_args(argv)


def time_backward(forward, dy, params, reps):
    """Median ms of ``y.backward(dy)`` alone, timed with CUDA events after an untimed forward (no
    retain_graph, which compiled graphs with donated buffers refuse)."""
    import torch

    times = []
    for i in range(reps + 1):  # iteration 0 warms up
        for p in params:
            p.grad = None
        y = forward()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        y.backward(dy)
        end.record()
        torch.cuda.synchronize()
        if i > 0:
            times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("bench_dwconv: CUDA is required (it times GPU kernels); nothing measured or written.")
        return 0
    from facefuse.kernels._common import INTERPRETING

    if INTERPRETING:
        print("bench_dwconv: unset TRITON_INTERPRET to benchmark compiled kernels.")
        return 2
    from triton.testing import do_bench

    from facefuse.kernels.dwconv import depthwise_conv7x7, depthwise_conv7x7_reference, set_backward_mode

    def with_backward(mode):  # the backward mode is taken when the forward runs
        def run(*args):
            previous = set_backward_mode(mode)
            try:
                return depthwise_conv7x7(*args)
            finally:
                set_backward_mode(previous)
        return run

    split, fused = with_backward("split"), with_backward("fused")

    torch.backends.cudnn.benchmark = True
    dtype = getattr(torch, args.dtype)
    dev = torch.device("cuda")
    compiled = torch.compile(depthwise_conv7x7_reference)
    rows = []
    for H, W, C in SHAPES:
        torch.manual_seed(0)
        conv = torch.nn.Conv2d(C, C, 7, padding=3, groups=C).to(dev, dtype).to(memory_format=torch.channels_last)
        x = torch.randn(args.batch, C, H, W, device=dev, dtype=dtype).contiguous(memory_format=torch.channels_last)
        x.requires_grad_()
        dy = torch.randn_like(x)
        providers = {
            "triton": lambda: split(x, conv.weight, conv.bias),
            "triton_fused": lambda: fused(x, conv.weight, conv.bias),
            "cudnn": lambda: conv(x),
            "compile": lambda: compiled(x, conv.weight, conv.bias),
        }
        with torch.no_grad():
            max_diff = float((providers["triton"]() - providers["cudnn"]()).abs().max())
        params = [x, conv.weight, conv.bias]
        for mode in MODES:
            row = {"shape": f"{args.batch}x{H}x{W}x{C}", "pass": mode, "max_abs_diff_vs_cudnn": max_diff}
            nbytes = BYTES_FACTOR[mode] * x.numel() * x.element_size()
            for name, fwd in providers.items():
                if mode == "bwd":
                    ms = time_backward(fwd, dy, params, args.bwd_reps)
                else:
                    fn = fwd if mode == "fwd" else (lambda fwd=fwd: fwd().backward(dy))
                    fn()  # autotune / compile outside the timing
                    ms = do_bench(fn, warmup=args.warmup, rep=args.rep, grad_to_none=params, return_mode="median")
                row[f"{name}_ms"] = ms
                row[f"{name}_gbps"] = nbytes / (ms * 1e-3) / 1e9
            row["speedup_vs_cudnn"] = row["cudnn_ms"] / row["triton_ms"]
            row["speedup_vs_compile"] = row["compile_ms"] / row["triton_ms"]
            row["fused_vs_split"] = row["triton_ms"] / row["triton_fused_ms"]  # > 1: the one-pass backward wins
            rows.append(row)
            print(f"{row['shape']} {mode}: " + ", ".join(f"{p} {row[f'{p}_ms']:.4f} ms" for p in PROVIDERS),
                  flush=True)
        del x, dy, conv, providers
        gc.collect()
        torch.cuda.empty_cache()

    columns = ["shape", "pass"] + [f"{p}_{k}" for k in ("ms", "gbps") for p in PROVIDERS]
    print_table(rows, columns + ["speedup_vs_cudnn", "speedup_vs_compile", "fused_vs_split", "max_abs_diff_vs_cudnn"])
    settings = dict(batch=args.batch, dtype=args.dtype, shapes_hwc=SHAPES, layout="channels_last",
                    bias=True, warmup_ms=args.warmup, rep_ms=args.rep, bwd_reps=args.bwd_reps,
                    timing="fwd, fwd+bwd: triton.testing.do_bench median; bwd: CUDA events around "
                           "y.backward(dy) after an untimed forward, median",
                    bytes="fwd 2x, bwd 3x, fwd+bwd 5x the size of x", cudnn_benchmark=True)
    path = write_results("dwconv", device_name(), settings, rows)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
