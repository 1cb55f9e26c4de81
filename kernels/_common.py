"""Small helpers shared by the Triton ops: interpreter detection, config choice, input checks.

``INTERPRETING`` is read once, at import time, from ``TRITON_INTERPRET`` (the one environment
variable the kernels look at): Triton itself decides at ``@triton.jit`` time whether a kernel runs
compiled or under the CPU interpreter, so the autotune config lists must be chosen then as well.
"""

from __future__ import annotations

import os

import torch
import triton

INTERPRETING: bool = os.environ.get("TRITON_INTERPRET", "").strip().lower() in {"1", "true", "on", "yes"}

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def pick_configs(gpu_configs: list[triton.Config], interp_config: triton.Config) -> list[triton.Config]:
    """The GPU autotune list, or the single config the interpreter can run (multi-config autotune
    crashes under ``TRITON_INTERPRET=1``; small blocks also keep the interpreter fast). With
    ``FACEFUSE_AUTOTUNE=0`` (read at import) only the first GPU config: tests on a GPU then compile one
    config per kernel instead of autotuning every shape (benchmarks/gpu_check.py sets it for tests)."""
    if INTERPRETING:
        return [interp_config]
    if os.environ.get("FACEFUSE_AUTOTUNE", "").strip() == "0":  # correctness runs: no autotuning
        return gpu_configs[:1]
    return gpu_configs


def dot_precision(dtype: torch.dtype) -> str | None:
    """``tl.dot`` input precision: for fp32 operands "tf32x3" (three TF32 tensor-core products,
    close to fp32 accuracy; plain "tf32" would round the inputs to 10 mantissa bits, and "ieee"
    FMA dots compile and run far slower); bf16/fp16 operands use Triton's default."""
    return "tf32x3" if dtype == torch.float32 else None


def check_tensor(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def check_float_dtype(t: torch.Tensor, name: str) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; the Triton kernel supports float32, bfloat16, float16")


def check_same_device(tensors: dict[str, torch.Tensor]) -> torch.device:
    """All tensors on one device, and a device the kernels can run on: CUDA, or any device while
    the Triton interpreter is active (``TRITON_INTERPRET=1``)."""
    devices = {name: t.device for name, t in tensors.items()}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all inputs must be on one device, got {listing}")
    if first.type != "cuda" and not INTERPRETING:
        raise ValueError(
            f"the Triton kernel needs CUDA tensors, got tensors on {first}; use the *_reference "
            "function on CPU, or set TRITON_INTERPRET=1 before importing kernels to interpret it"
        )
    return first


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors on ``device``; a small fixed number under the interpreter, which
    runs programs one after another."""
    if INTERPRETING or device.type != "cuda":
        return 2
    return torch.cuda.get_device_properties(device).multi_processor_count


def split_range(total: int, n_parallel: int, target_programs: int, granule: int,
                max_splits: int | None = None) -> tuple[int, int]:
    """Split ``total`` items into ``(n_splits, per_split)`` chunks so that ``n_parallel *
    n_splits`` is about ``target_programs``; ``per_split`` is a multiple of ``granule`` and every
    split is non-empty."""
    want = max(1, triton.cdiv(target_programs, max(1, n_parallel)))
    if max_splits is not None:
        want = min(want, max_splits)
    want = min(want, triton.cdiv(total, granule))
    per_split = triton.cdiv(triton.cdiv(total, want), granule) * granule
    return triton.cdiv(total, per_split), per_split
