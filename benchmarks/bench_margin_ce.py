"""Benchmark the fused margin cross-entropy against its eager and torch.compile'd reference (GPU).

For each class count and pass (fwd, bwd, fwd+bwd): median time, achieved TFLOP/s against the work
each provider really does (the fused kernel: ``kernels.margin_ce.margin_ce_work``, which counts the
backward's recomputation of the cosines, 1 + 3 = 4 GEMM-equivalents of 2*B*C*D FLOPs without the
gradient filter; eager and compile: their matmuls, 2*B*D*C forward, 4*B*D*C backward), the
"useful" TFLOP/s against 2/4/6*B*C*D for all providers, and the peak memory allocated on top of what existed before the pass
(inputs, and for bwd the saved graph). An out-of-memory case is recorded as "OOM".

    python benchmarks/bench_margin_ce.py                      # B=512, D=512, C in {8631, 1e5, 1e6}, bf16
    python benchmarks/bench_margin_ce.py --classes 8631 --dtype float32

Writes benchmarks/results/margin_ce-<device>.json. The eager reference upcasts bf16 inputs to fp32;
TF32 matmuls are allowed for the baselines (``--no-tf32`` to forbid), which makes them faster.
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import device_name, print_table, write_results  # noqa: E402

MODES = ("fwd", "bwd", "fwd+bwd")
FLOP_FACTOR = {"fwd": 2, "bwd": 4, "fwd+bwd": 6}  # matmul work of the eager/compiled reference
WORK_KEY = {"fwd": "fwd", "bwd": "bwd", "fwd+bwd": "total"}
PROVIDERS = ("triton", "eager", "compile")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--classes", type=int, nargs="+", default=[8631, 100_000, 1_000_000])
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    p.add_argument("--s", type=float, default=64.0)
    p.add_argument("--m1", type=float, default=1.0)
    p.add_argument("--m2", type=float, default=0.5)
    p.add_argument("--m3", type=float, default=0.0)
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--warmup", type=int, default=25, help="do_bench warmup (ms)")
    p.add_argument("--rep", type=int, default=200, help="do_bench repetition time (ms)")
    p.add_argument("--bwd-reps", type=int, default=20, help="timed backward passes (each after a forward)")
    p.add_argument("--grad-filter", action="store_true", help="fused backward with the gradient filter")
    p.add_argument("--no-tf32", action="store_true", help="forbid TF32 in the baselines' fp32 matmuls")
    return p.parse_args(argv)


def _peak_extra(run):
    """Peak bytes allocated by ``run()`` on top of what was allocated before it."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def _time_backward(make_loss, params, reps):
    """Median ms of ``loss.backward()`` alone, timed with CUDA events after an untimed forward (no
    retain_graph, which compiled graphs with donated buffers refuse), and its peak extra memory."""
    import torch

    times, peak = [], 0
    for i in range(reps + 1):
        for p in params:
            p.grad = None
        loss = make_loss()
        torch.cuda.synchronize()
        if i == 1:  # iteration 0 warms up (autotuning, compilation)
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        loss.backward()
        end.record()
        torch.cuda.synchronize()
        if i == 1:
            peak = torch.cuda.max_memory_allocated() - base
        if i > 0:
            times.append(start.elapsed_time(end))
        del loss
    return sorted(times)[len(times) // 2], peak


def run_case(provider_fn, mode, x, w, y, kw, bench, bwd_reps):
    """(median ms, peak extra bytes) of one provider and pass, or ("OOM", None)."""
    import torch

    def fwd():
        return provider_fn(x, w, y, **kw)

    def fwd_bwd():
        x.grad = w.grad = None
        fwd().backward()

    try:
        if mode == "bwd":
            return _time_backward(fwd, (x, w), bwd_reps)
        run = fwd if mode == "fwd" else fwd_bwd
        run()  # autotune / compile outside the timing
        peak = _peak_extra(run)
        return bench(run), peak
    except torch.OutOfMemoryError:
        return "OOM", None
    finally:
        x.grad = w.grad = None
        gc.collect()
        torch.cuda.empty_cache()


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("bench_margin_ce: CUDA is required (it times GPU kernels); nothing measured or written.")
        return 0
    from facefuse.kernels._common import INTERPRETING

    if INTERPRETING:
        print("bench_margin_ce: unset TRITON_INTERPRET to benchmark compiled kernels.")
        return 2
    from triton.testing import do_bench

    import functools

    from facefuse.kernels.margin_ce import margin_ce_work, margin_cross_entropy, margin_cross_entropy_reference

    torch.backends.cuda.matmul.allow_tf32 = not args.no_tf32
    dtype = getattr(torch, args.dtype)
    dev = torch.device("cuda")
    B, D = args.batch, args.dim
    kw = dict(s=args.s, m1=args.m1, m2=args.m2, m3=args.m3, label_smoothing=args.label_smoothing)
    providers = {
        "triton": functools.partial(margin_cross_entropy, grad_filter=args.grad_filter),
        "eager": margin_cross_entropy_reference,
        "compile": torch.compile(margin_cross_entropy_reference),
    }
    bench = lambda fn: do_bench(fn, warmup=args.warmup, rep=args.rep, return_mode="median")  # noqa: E731

    rows = []
    for C in args.classes:
        g = torch.Generator(device=dev).manual_seed(0)
        x = torch.randn(B, D, device=dev, dtype=dtype, generator=g).requires_grad_()
        w = torch.randn(C, D, device=dev, dtype=dtype, generator=g).requires_grad_()
        y = torch.randint(0, C, (B,), device=dev, generator=g)
        try:  # agreement of the fused loss with the reference on these inputs
            with torch.no_grad():
                fused, ref = margin_cross_entropy(x, w, y, **kw), margin_cross_entropy_reference(x, w, y, **kw)
                loss_diff = float((fused - ref).abs())
        except torch.OutOfMemoryError:
            loss_diff = "OOM"
        for mode in MODES:
            row = {"classes": C, "pass": mode, "loss_abs_diff": loss_diff}
            useful = FLOP_FACTOR[mode] * B * D * C
            work = margin_ce_work(B, C, D, x_dtype=dtype, label_smoothing=args.label_smoothing,
                                  grad_filter=args.grad_filter)[WORK_KEY[mode]]
            row["triton_gemm_eq"] = work["gemm_eq"]
            row["triton_w_reads"] = work["w_reads"]
            for name, fn in providers.items():
                ms, peak = run_case(fn, mode, x, w, y, kw, bench, args.bwd_reps)
                flops = work["flops"] if name == "triton" else useful
                ok = isinstance(ms, float)
                row[f"{name}_ms"] = ms
                row[f"{name}_tflops"] = flops / (ms * 1e-3) / 1e12 if ok else None
                row[f"{name}_useful_tflops"] = useful / (ms * 1e-3) / 1e12 if ok else None
                row[f"{name}_peak_mib"] = peak / 2**20 if peak is not None else None
            for base in ("eager", "compile"):
                t, b = row["triton_ms"], row[f"{base}_ms"]
                row[f"speedup_vs_{base}"] = b / t if isinstance(t, float) and isinstance(b, float) else None
            rows.append(row)
            print(f"C={C} {mode}: " + ", ".join(f"{p} {row[f'{p}_ms']}" for p in PROVIDERS), flush=True)
        del x, w, y
        gc.collect()
        torch.cuda.empty_cache()

    columns = ["classes", "pass", "triton_gemm_eq"] + [f"{p}_{k}" for k in ("ms", "tflops", "peak_mib")
                                                       for p in PROVIDERS]
    print_table(rows, columns + ["speedup_vs_eager", "speedup_vs_compile", "loss_abs_diff"])
    settings = dict(batch=B, dim=D, classes=args.classes, dtype=args.dtype, **kw, warmup_ms=args.warmup,
                    rep_ms=args.rep, bwd_reps=args.bwd_reps,
                    timing="fwd, fwd+bwd: triton.testing.do_bench median; bwd: CUDA events around "
                           "loss.backward() after an untimed forward, median",
                    baseline_tf32=not args.no_tf32, grad_filter=args.grad_filter,
                    flops="triton: margin_ce_work (real count, recomputation included; filter assumed "
                          "to keep every tile); eager/compile: 2/4/6 * B*D*C; *_useful_tflops: 2/4/6 * B*D*C "
                          "for all",
                    peak="max_memory_allocated minus memory_allocated before the pass (bwd: after the forward)")
    path = write_results("margin_ce", device_name(), settings, rows)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
