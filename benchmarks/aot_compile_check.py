"""Compile every autotune config of the Triton kernels offline for sm_90 (H100/H200) and sm_89 (L40).

No GPU is needed: Triton's own compiler builds each config of the margin cross-entropy kernels
(forward, the one-pass backward) and the depthwise 7x7 convolution kernels (forward, weight gradient, one-pass backward) for each
target, and the cubin is read with the ``cuobjdump`` that ships with Triton
(``triton/backends/nvidia/bin``). Per config and target it records the shared memory the kernel
needs (and whether it fits the target's per-block limit), registers per thread, and spills (stack
and local-memory bytes), and the static SASS instruction mix by opcode family. A config that fails to compile there (too much shared memory, say) is a row
with its error: the autotuner skips such configs on that GPU. The exit code is 1 when some kernel has
no config that compiles and fits on some target (it could not run there), else 0.

    python benchmarks/aot_compile_check.py                          # bf16, every kernel, both targets
    python benchmarks/aot_compile_check.py --dtype fp32 --kernels fwd bwd --arch 89
    python benchmarks/aot_compile_check.py --kernels fwd \\
        --config BLOCK_B=64,BLOCK_C=64,BLOCK_K=64,num_warps=4,num_stages=3   # try a candidate

Writes benchmarks/results/aot_compile-<dtype>-<device>.json (the device is the machine that compiled;
the target of each row is its ``arch``).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import device_name, print_table, write_results  # noqa: E402

SHARED_LIMIT = {90: 227 * 1024, 89: 99 * 1024}  # bytes of shared memory per block (opt-in maximum)
ARCH_NAMES = {90: "sm_90 (H100/H200)", 89: "sm_89 (L40)"}
# Triton specialises an integer argument that is a multiple of 16 at launch; the face shapes are (D 512, batch
# 128/256, ConvNeXt channels 96-768), so compile with that hint, as the autotuner would see it.
DIVISIBLE_BY_16 = {"D", "B", "stride_xb", "stride_wc", "C_PER_SPLIT", "P_PER_SPLIT", "NHW"}


def margin_ce_kernels(ptr: str, prec: str | None, w_ptr: str | None = None) -> dict[str, tuple]:
    """name -> (module, kernel attribute, signature, constexprs) of the margin cross-entropy kernels
    (``w_ptr``: the weight's pointer type when it differs from x's, e.g. fp32 master weights)."""
    consts = {"INTERP": False, "DOT_PREC": prec}
    w_ptr = w_ptr or ptr
    fwd = dict(x_ptr=ptr, w_ptr=w_ptr, labels_ptr="*i64", zt_ptr="*fp32", nx_ptr="*fp32", nw_ptr="*fp32",
               m_ptr="*fp32", l_ptr="*fp32", sz_ptr="*fp32", best_ptr="*fp32", arg_ptr="*i32", B="i32", C="i32",
               D="i32", C_PER_SPLIT="i32", stride_xb="i32", stride_wc="i32", s="fp32", eps="fp32")
    bwd = dict(x_ptr=ptr, w_ptr=w_ptr, labels_ptr="*i64", nx_ptr="*fp32", nw_ptr="*fp32", lse_ptr="*fp32",
               zt_ptr="*fp32", dphi_ptr="*fp32", g_ptr="*fp32", dx_ptr="*fp32", dw_ptr="*fp32", B="i32", C="i32",
               D="i32", stride_xb="i32", stride_wc="i32", s="fp32", ls="fp32", ls_tile="fp32", ls_fix="fp32",
               eps="fp32", filt_eps="fp32")
    return {"fwd": ("margin_ce", "_margin_ce_fwd_kernel", fwd, consts),
            "bwd": ("margin_ce", "_margin_ce_bwd_kernel", bwd, dict(consts, NEED_DX=True, NEED_DW=True))}


def dwconv_kernels(ptr: str) -> dict[str, tuple]:
    """name -> (module, kernel attribute, signature, constexprs) of the depthwise 7x7 kernels."""
    fwd = dict(x_ptr=ptr, w_ptr="*fp32", b_ptr="*fp32", y_ptr=ptr, NHW="i32", H="i32", W="i32", C="i32")
    bwd_w = dict(x_ptr=ptr, dy_ptr=ptr, dw_ptr="*fp32", db_ptr="*fp32", NHW="i32", H="i32", W="i32", C="i32",
                 P_PER_SPLIT="i32")
    bwd_fused = dict(x_ptr=ptr, dy_ptr=ptr, w_ptr="*fp32", dx_ptr=ptr, dw_ptr="*fp32", db_ptr="*fp32", NHW="i32",
                     H="i32", W="i32", C="i32", P_PER_SPLIT="i32")
    return {"conv": ("dwconv", "_dwconv7x7_kernel", fwd, {"HAS_BIAS": True}),
            "convw": ("dwconv", "_dwconv7x7_bwd_w_kernel", bwd_w, {"HAS_BIAS": True}),
            "convbwd": ("dwconv", "_dwconv7x7_bwd_fused_kernel", bwd_fused, {"HAS_BIAS": True})}


KERNEL_NAMES = ("fwd", "bwd", "conv", "convw", "convbwd")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32", "bf16w32"], default="bf16",
                   help="x and w operand dtype (bf16w32: bf16 x with fp32 master weights, margin CE only)")
    p.add_argument("--kernels", nargs="+", choices=KERNEL_NAMES, default=list(KERNEL_NAMES),
                   help="fwd/bwd: margin cross-entropy; conv/convw: depthwise 7x7 forward / weight gradient")
    p.add_argument("--arch", type=int, nargs="+", choices=sorted(SHARED_LIMIT, reverse=True), default=[90, 89],
                   help="compute capabilities to compile for")
    p.add_argument("--config", action="append", default=[], metavar="K=V,...",
                   help="compile this config instead of the kernel's autotune list (repeatable), e.g. "
                        "BLOCK_B=64,BLOCK_C=64,BLOCK_K=64,num_warps=4,num_stages=3")
    return p.parse_args(argv)


def parse_config(text: str):
    """``"BLOCK_B=64,...,num_warps=4,num_stages=3"`` -> ``triton.Config``."""
    import triton

    values = {k.strip(): int(v) for k, v in (item.split("=", 1) for item in text.split(","))}
    warps, stages = values.pop("num_warps", 4), values.pop("num_stages", 3)
    return triton.Config(values, num_warps=warps, num_stages=stages)


def tool_dir() -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def cuobjdump(cubin: bytes, flag: str) -> str:
    """The text ``cuobjdump FLAG`` prints for a cubin (written to a temporary file first)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "kernel.cubin"
        path.write_bytes(cubin)
        return subprocess.run([str(tool_dir() / "cuobjdump"), flag, str(path)],
                              capture_output=True, text=True, check=True).stdout


def cubin_resources(cubin: bytes) -> dict:
    """Registers per thread, stack and local-memory bytes of a cubin, from ``cuobjdump``."""
    out = cuobjdump(cubin, "--dump-resource-usage")
    fields = {"registers": "REG", "stack_bytes": "STACK", "local_bytes": "LOCAL"}
    return {key: int(re.search(rf"{tag}:(\d+)", out).group(1)) for key, tag in fields.items()}


def compile_config(kernel, signature: dict, constexprs: dict, config, arch: int):
    """Compile one autotune config of ``kernel`` (a ``@triton.jit`` function) for ``sm_<arch>``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    meta = {**constexprs, **config.kwargs}
    sig = {**signature, **{name: "constexpr" for name in meta}}
    divisible = DIVISIBLE_BY_16 | ({"C"} if "NHW" in sig else set())  # dwconv: C is the channel count
    attrs = {(kernel.arg_names.index(n),): [["tt.divisibility", 16]]
             for n, t in sig.items() if t.startswith("*") or n in divisible}
    source = ASTSource(kernel, sig, constexprs=meta, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": config.num_warps, "num_stages": config.num_stages})


def check_config(name: str, kernel, signature, constexprs, config, arch: int) -> dict:
    """One result row: the config, and its resources on ``arch`` or the compile error."""
    row = {"kernel": name, "arch": f"sm_{arch}", "config": dict(config.kwargs), "num_warps": config.num_warps,
           "num_stages": config.num_stages}
    try:
        compiled = compile_config(kernel, signature, constexprs, config, arch)
    except Exception as exc:  # the row records why; configs that cannot build on a target are expected
        return {**row, "compiled": False, "fits": False, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    shared = compiled.metadata.shared
    return {**row, "compiled": True, "fits": shared <= SHARED_LIMIT[arch], "shared_kb": round(shared / 1024, 1),
            "shared_limit_kb": SHARED_LIMIT[arch] // 1024, **cubin_resources(compiled.asm["cubin"]),
            "sass": sass_mix(compiled.asm["cubin"])}


def describe(row: dict) -> str:
    head = f"{row['kernel']} {row['arch']} {row['config']} w{row['num_warps']} s{row['num_stages']}"
    if not row["compiled"]:
        return f"{head}: FAILED {row['error'][:160]}"
    return (f"{head}: smem {row['shared_kb']} KB{'' if row['fits'] else ' TOO BIG'}, regs {row['registers']}, "
            f"stack {row['stack_bytes']}, local {row['local_bytes']}")


def kernel_specs(dtype: str) -> dict[str, tuple]:
    if dtype == "bf16w32":
        return margin_ce_kernels("*bf16", None, "*fp32")
    ptr = f"*{dtype}"
    return {**margin_ce_kernels(ptr, "tf32x3" if dtype == "fp32" else None), **dwconv_kernels(ptr)}


# SASS opcode families counted per kernel (static counts over the whole kernel; loops are not
# weighted by their trip counts): tensor-core MMAs, FMAs, global/shared memory, atomics, shuffles
# and barriers are what the instruction-mix statements are about.
SASS_FAMILIES = {
    "mma": ("HMMA", "HGMMA", "IMMA"), "ffma": ("FFMA",), "fadd": ("FADD",), "fmul": ("FMUL",),
    "ldg": ("LDG",), "stg": ("STG",), "red_atom": ("RED", "REDG", "ATOM", "ATOMG"), "lds": ("LDS", "LDSM"),
    "sts": ("STS", "STSM"), "shfl": ("SHFL",), "bar": ("BAR",), "ldgsts_tma": ("LDGSTS", "UTMALDG", "UBLKCP"),
}


def sass_mix(cubin: bytes) -> dict:
    """Static SASS opcode counts of a cubin by family (``cuobjdump -sass``), and the total."""
    out = cuobjdump(cubin, "-sass")
    ops = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", out)
    counts = {fam: sum(1 for op in ops if op in names) for fam, names in SASS_FAMILIES.items()}
    counts["total"] = len(ops)
    return counts


def load_kernels():
    """The kernel modules with their GPU autotune lists (chosen at import from TRITON_INTERPRET)."""
    os.environ.pop("TRITON_INTERPRET", None)  # offline compilation, not the interpreter's single config
    from facefuse.kernels import _common, dwconv, margin_ce

    if _common.INTERPRETING:
        raise RuntimeError("facefuse.kernels was imported with TRITON_INTERPRET set: run this script on its own")
    return {"margin_ce": margin_ce, "dwconv": dwconv}


def check_kernels(names: list[str], dtype: str, archs: list[int], candidates: list) -> list[dict]:
    """One row per (kernel, target, config): the autotune list, or ``candidates`` when given."""
    modules = load_kernels()
    specs = kernel_specs(dtype)
    rows = []
    for name in names:
        module, attr, signature, constexprs = specs[name]
        autotuner = getattr(modules[module], attr)
        for arch in archs:
            for config in candidates or autotuner.configs:
                rows.append(check_config(name, autotuner.fn, signature, constexprs, config, arch))
                print(describe(rows[-1]), flush=True)
    return rows


def unrunnable(rows: list[dict]) -> list[tuple[str, str]]:
    """(kernel, target) pairs where no config compiled and fit."""
    return sorted({(r["kernel"], r["arch"]) for r in rows} - {(r["kernel"], r["arch"]) for r in rows if r["fits"]})


def main(argv=None) -> int:
    args = parse_args(argv)
    if not (tool_dir() / "cuobjdump").is_file():
        print(f"aot_compile_check: {tool_dir() / 'cuobjdump'} not found (it ships with triton's NVIDIA backend)")
        return 2
    candidates = [parse_config(c) for c in args.config]
    rows = check_kernels(args.kernels, args.dtype, args.arch, candidates)
    print_table(rows, ["kernel", "arch", "config", "num_warps", "num_stages", "shared_kb", "fits", "registers",
                       "stack_bytes", "local_bytes"])
    settings = dict(dtype=args.dtype, kernels=args.kernels, targets=[ARCH_NAMES[a] for a in args.arch],
                    shared_limit_kb={f"sm_{a}": SHARED_LIMIT[a] // 1024 for a in args.arch},
                    configs="given with --config" if candidates else "the kernels' autotune lists",
                    tools="triton.compile (ASTSource, GPUTarget) and triton's cuobjdump --dump-resource-usage / -sass",
                    sass="static opcode counts per family over the whole kernel (not weighted by trip counts)",
                    divisibility="pointers and " + ", ".join(sorted(DIVISIBLE_BY_16)) + " divisible by 16")
    path = write_results(f"aot_compile-{args.dtype}", device_name("cpu"), settings, rows)
    print(f"wrote {path}")
    for kernel, arch in unrunnable(rows):
        print(f"aot_compile_check: no config of {kernel} compiles and fits on {arch}")
    return 1 if unrunnable(rows) else 0

if __name__ == "__main__":
    sys.exit(main())
