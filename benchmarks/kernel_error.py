"""Measured error of the fused margin cross-entropy against its float64 reference, per dtype.

The test tolerances of ``tests/test_kernel_margin_ce.py`` are about 2x these figures. Runs on a GPU,
or on CPU under the Triton interpreter (set ``TRITON_INTERPRET=1``; tiny shapes, a minute or two).
Loss error is absolute; gradient error is relative to the largest reference gradient entry.

    TRITON_INTERPRET=1 python benchmarks/kernel_error.py
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import device_name, print_table, write_results  # noqa: E402

SHAPES = [(1, 3, 5), (7, 17, 37), (33, 64, 130), (19, 45, 101), (40, 70, 197)]  # (B, D, C)
VARIANTS = {  # name -> (x dtype, W dtype)
    "fp32": (torch.float32, torch.float32),
    "bf16": (torch.bfloat16, torch.bfloat16),
    "fp16": (torch.float16, torch.float16),
    "bf16 x, fp32 W": (torch.bfloat16, torch.float32),
    "fp16 x, fp32 W": (torch.float16, torch.float32),
}


def inputs(B, D, C, seed):
    """Target cosines spread over most of (-1, 1), as the tests draw them (float64)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(C, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (B,), generator=g)
    a = (torch.rand(B, 1, generator=g, dtype=torch.float64) * 4 - 2) * math.sqrt(D)
    return a * F.normalize(w[y], dim=1) + torch.randn(B, D, generator=g, dtype=torch.float64), w, y


def errors(x64, w64, y, x_dtype, w_dtype, device, grad_filter: bool) -> tuple[float, float]:
    from facefuse.kernels.margin_ce import margin_cross_entropy, margin_cross_entropy_reference

    kw = dict(s=64.0, m1=1.0, m2=0.5, m3=0.0, label_smoothing=0.1)
    x = x64.to(device, x_dtype).requires_grad_()
    w = w64.to(device, w_dtype).requires_grad_()
    got = margin_cross_entropy(x, w, y.to(device), grad_filter=grad_filter, **kw)
    got.backward()
    # the reference sees the same (rounded) inputs in float64: the error is the kernel's, not the cast's
    xr, wr = x.detach().double().cpu().requires_grad_(), w.detach().double().cpu().requires_grad_()
    ref = margin_cross_entropy_reference(xr, wr, y, **kw)
    ref.backward()
    scale = max(xr.grad.abs().max().item(), wr.grad.abs().max().item())
    grad_err = max((x.grad.double().cpu() - xr.grad).abs().max().item(),
                   (w.grad.double().cpu() - wr.grad).abs().max().item()) / scale
    return abs(got.item() - ref.item()), grad_err


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args(argv)
    from facefuse.kernels._common import INTERPRETING

    device = "cpu" if INTERPRETING else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("kernel_error: no GPU; set TRITON_INTERPRET=1 to measure under the interpreter.")
        return 0
    rows = []
    for name, (xd, wd) in VARIANTS.items():
        loss_err = grad_err = 0.0
        for B, D, C in SHAPES:
            for seed in range(args.seeds):
                x, w, y = inputs(B, D, C, seed)
                for grad_filter in (False, True):
                    le, ge = errors(x, w, y, xd, wd, device, grad_filter)
                    loss_err, grad_err = max(loss_err, le), max(grad_err, ge)
        rows.append({"dtype": name, "max_loss_error": float(f"{loss_err:.3g}"),
                     "max_grad_error_rel": float(f"{grad_err:.3g}")})
    print_table(rows, ["dtype", "max_loss_error", "max_grad_error_rel"])
    settings = {"shapes_BDC": SHAPES, "seeds": args.seeds, "margin": "arcface s=64 m=0.5", "label_smoothing": 0.1,
                "grad_filter": [False, True], "interpreter": INTERPRETING}
    print(f"wrote {write_results('kernel_error', device_name(device), settings, rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
