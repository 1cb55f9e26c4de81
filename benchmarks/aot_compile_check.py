"""Compile every autotune config of the Triton kernels offline for sm_90 (H100/H200) and sm_89 (L40),
with no GPU needed, and print shared memory, registers and spills per config.

    python benchmarks/aot_compile_check.py bf16 512 all     # dtype, D, which: all|fwd|dx|dw|conv
"""
import os, sys, subprocess, tempfile, re
os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
import facefuse.kernels.margin_ce as M
import facefuse.kernels.dwconv as DW

BIN = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin")
SMEM = {90: 227 * 1024, 89: 99 * 1024}

def resources(cubin):
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin); p = f.name
    out = subprocess.run([f"{BIN}/cuobjdump", "--dump-resource-usage", p], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", out); stack = re.search(r"STACK:(\d+)", out); lmem = re.search(r"LOCAL:(\d+)", out)
    return int(regs.group(1)), int(stack.group(1)), int(lmem.group(1))

def comp(jit, sig, consts, cfg, cc):
    sig = dict(sig)
    for k in consts: sig[k] = "constexpr"
    for k in cfg.kwargs: sig[k] = "constexpr"
    c = dict(consts); c.update(cfg.kwargs)
    div16 = {"D", "B", "stride_xb", "stride_wc", "C_PER_SPLIT", "P_PER_SPLIT", "NHW"} | ({"C"} if "NHW" in sig else set())
    attrs = {(jit.arg_names.index(n),): [["tt.divisibility", 16]] for n, t in sig.items() if t.startswith("*") or n in div16}
    src = ASTSource(jit, sig, constexprs=c, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    regs, stack, lmem = resources(k.asm["cubin"])
    sh = k.metadata.shared
    return f"smem {sh/1024:6.1f}KB {'OK ' if sh <= SMEM[cc] else 'TOO BIG'} regs {regs:3d} stack {stack} local {lmem}"

def run(name, ak, sigf, consts):
    cand = os.environ.get("CAND")
    if cand:
        ak.configs = [triton.Config(dict(BLOCK_B=t[0], BLOCK_C=t[1], BLOCK_K=t[2], **({'BLOCK_DO': t[3]} if len(t) > 5 else {})), num_warps=t[-2], num_stages=t[-1]) for t in eval(cand)]
    for cc in (90, 89):
        for cfg in ak.configs:
            try:
                r = comp(ak.fn, sigf, consts, cfg, cc)
            except Exception as e:
                r = f"FAIL {type(e).__name__}: {str(e)[:200]}"
            print(f"{name} sm{cc} {cfg.kwargs} w{cfg.num_warps} s{cfg.num_stages}: {r}", flush=True)

dt = sys.argv[1] if len(sys.argv) > 1 else "bf16"
prec = "tf32x3" if dt == "fp32" else None
BD = int(sys.argv[2]) if len(sys.argv) > 2 else 512
which = sys.argv[3] if len(sys.argv) > 3 else "all"
P = f"*{dt}"
if which in ("all", "fwd"):
    run("fwd", M._margin_ce_fwd_kernel, dict(x_ptr=P, w_ptr=P, labels_ptr="*i64", inv_nx_ptr="*fp32", inv_nw_ptr="*fp32", zt_ptr="*fp32",
        m_ptr="*fp32", l_ptr="*fp32", sz_ptr="*fp32", best_ptr="*fp32", arg_ptr="*i32", B="i32", C="i32", D="i32", C_PER_SPLIT="i32",
        stride_xb="i32", stride_wc="i32", s="fp32"), dict(INTERP=False, DOT_PREC=prec))
bw = dict(x_ptr=P, w_ptr=P, labels_ptr="*i64", nx_ptr="*fp32", lse_ptr="*fp32", zt_ptr="*fp32", dphi_ptr="*fp32", g_ptr="*fp32",
          B="i32", C="i32", D="i32", stride_xb="i32", stride_wc="i32", s="fp32", ls="fp32", ls_c="fp32", eps="fp32")
if which in ("all", "dx"):
    run("dx", M._margin_ce_bwd_dx_kernel, dict(bw, inv_nw_ptr="*fp32", dx_ptr="*fp32", C_PER_SPLIT="i32"), dict(INTERP=False, DOT_PREC=prec))
if which in ("all", "dw"):
    run("dw", M._margin_ce_bwd_dw_kernel, dict(bw, nw_ptr="*fp32", dw_ptr=P), dict(INTERP=False, DOT_PREC=prec))
if which in ("all", "conv"):
    run("conv", DW._dwconv7x7_kernel, dict(x_ptr=P, w_ptr="*fp32", b_ptr="*fp32", y_ptr=P, NHW="i32", H="i32", W="i32", C="i32"), dict(HAS_BIAS=True))
    run("convw", DW._dwconv7x7_bwd_w_kernel, dict(x_ptr=P, dy_ptr=P, dw_ptr="*fp32", db_ptr="*fp32", NHW="i32", H="i32", W="i32", C="i32", P_PER_SPLIT="i32"), dict(HAS_BIAS=True))
