"""One command for a lent GPU: every CUDA test, then a short sweep of the kernel benchmarks.

Within about 8 minutes on one H100/H200 it runs, each step in its own process with a time limit
taken from what is left of the budget:

1. the kernel tests on CUDA with compiled kernels (tests/test_kernel_*.py; ``FACEFUSE_AUTOTUNE=0`` so
   each kernel compiles one config instead of autotuning every test shape);
2. the other CUDA tests: ``-k "cuda or gpu"`` over tests/test_export.py, tests/test_index.py (FAISS GPU)
   and tests/test_backbones.py;
3. short sweeps of bench_margin_ce.py (B=512, D=512, C in {8631, 1e5}, bf16, filter off and on),
   bench_dwconv.py and bench_convnext_step.py, each writing its own JSON (with the device name) under
   benchmarks/results/;

and writes benchmarks/results/gpu_check-<device>.json: device, versions, and per step its command,
exit code, seconds and the tail of its output. Exit code 0 when every step passed, 1 otherwise.
Without CUDA it prints why and exits 0 (nothing to check).

    python benchmarks/gpu_check.py [--budget 480]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import device_name, write_results  # noqa: E402

PY = sys.executable


def steps() -> list[tuple[str, list[str], dict, int]]:
    """(name, command, extra environment, own time limit in seconds), in order."""
    no_tune = {"FACEFUSE_AUTOTUNE": "0"}
    bench = ROOT / "benchmarks"
    return [
        ("kernel tests", [PY, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                          "tests/test_kernel_margin_ce.py", "tests/test_kernel_dwconv.py"], no_tune, 180),
        ("cuda tests", [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cuda or gpu",
                        "tests/test_export.py", "tests/test_index.py", "tests/test_backbones.py"], {}, 90),
        ("bench margin_ce", [PY, str(bench / "bench_margin_ce.py"), "--classes", "8631", "100000",
                             "--warmup", "10", "--rep", "50", "--bwd-reps", "5"], {}, 120),
        ("bench margin_ce filter", [PY, str(bench / "bench_margin_ce.py"), "--classes", "100000", "--grad-filter",
                                    "--warmup", "10", "--rep", "50", "--bwd-reps", "5"], {}, 60),
        ("bench dwconv", [PY, str(bench / "bench_dwconv.py"), "--warmup", "10", "--rep", "50",
                          "--bwd-reps", "10"], {}, 60),
        ("bench convnext step", [PY, str(bench / "bench_convnext_step.py"), "--batch", "64", "--warmup", "50",
                                 "--rep", "300"], {}, 90),
    ]


def run_step(name, cmd, env_extra, limit):
    env = dict(os.environ, **env_extra)
    env.pop("TRITON_INTERPRET", None)  # compiled kernels
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit,
                              check=False)
        rc, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc = "timeout"
        out = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
    seconds = time.monotonic() - start
    print(f"[gpu_check] {name}: rc={rc} in {seconds:.0f}s", flush=True)
    print("\n".join(out.strip().splitlines()[-15:]), flush=True)
    return {"step": name, "command": " ".join(str(c) for c in cmd), "env": env_extra, "rc": rc,
            "seconds": round(seconds, 1), "limit_s": limit, "tail": out.strip().splitlines()[-40:]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=float, default=480.0, help="seconds for all steps together")
    args = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; nothing to check (run it on a machine with a GPU).")
        return 0
    deadline = time.monotonic() + args.budget
    rows = []
    for name, cmd, env, limit in steps():
        left = int(deadline - time.monotonic())
        if left < 20:
            rows.append({"step": name, "rc": "skipped", "seconds": 0, "tail": ["out of budget"]})
            print(f"[gpu_check] {name}: skipped, out of budget", flush=True)
            continue
        rows.append(run_step(name, cmd, env, min(limit, left)))
    import triton

    settings = dict(budget_s=args.budget, torch=torch.__version__, triton=triton.__version__,
                    cuda=torch.version.cuda, device=device_name())
    path = write_results("gpu_check", device_name(), settings, rows)
    failed = [r["step"] for r in rows if r["rc"] != 0]
    print(f"wrote {path}; " + (f"FAILED: {', '.join(failed)}" if failed else "every step passed"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
