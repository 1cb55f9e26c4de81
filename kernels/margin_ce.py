r"""Fused combined-margin softmax cross-entropy (cut-cross-entropy style) and its reference.

Math (both functions implement exactly this)::

    xh_i = x_i / max(||x_i||, 1e-12),  wh_j = w_j / max(||w_j||, 1e-12)      (F.normalize)
    cos_ij = xh_i . wh_j,  y = labels[i]
    phi_i = target_logit(cos_iy; m1, m2, m3, easy_margin)     (kernels/margin.py: the clamp, the
            combined margin, its continuation past theta* = (pi - m2)/m1 and easy_margin are
            written there, once, with dphi/dc = target_slope(...))
    z_ij = s*cos_ij (j != y),  z_iy = s*phi_i
    loss_i = lse_i - (1 - eps_ls) z_iy - (eps_ls / C) sum_j z_ij,   lse_i = log sum_j exp(z_ij)
    loss = mean_i loss_i;  preds_i = argmax_j cos_ij (no margin)

Gradient (what the fused backward computes; the reference gets it from autograd)::

    dL/dz_ij   = g_i (p_ij - (1 - eps_ls)[j = y] - eps_ls / C),   p = softmax(z_i),  g_i = 1/B
    dz/dcos    = s (j != y);  s * dphi/dc for j = y  (kernels/margin.py: target_slope)
    dx_i = (G_i - xh_i (xh_i . G_i)) / max(||x_i||, 1e-12),   G_i = sum_j dcos_ij wh_j
    dw_j = (H_j - wh_j (wh_j . H_j)) / max(||w_j||, 1e-12),   H_j = sum_i dcos_ij xh_i
    (no projection term when the norm is below 1e-12, as for F.normalize), and xh_i . G_i =
    sum_j dcos_ij cos_ij, wh_j . H_j = sum_i dcos_ij cos_ij: the projections need only O(B), O(C) sums.
    Both are linear in dcos, so each (row block, class block) tile adds its own complete share:
    dx_i += sum_{j in tile} dcos_ij (wh_j - cos_ij xh_i) / nx_i,
    dw_j += sum_{i in tile} dcos_ij (xh_i - cos_ij wh_j) / nw_j.
    Named settings (NormFace, ArcFace, CosFace, SphereFace): kernels/margin.py, MARGINS.

Design of the fused path (no B x C tensor is ever allocated):

- target terms: O(B). The launcher gathers w_y and computes cos_iy, s*phi and dphi/dc on the host
  side in float64 (device tensors, no sync), so the margin branch and clamp decisions are exact.
- forward: one kernel, programs over (row block, class split), row block fastest (so the programs
  sharing a W range run together and W comes from DRAM once). Each runs a K-looped tile GEMM
  x @ w^T and, from the same tiles, the squared norms of its rows of x and w (no separate norm pass
  over W); then the online log-sum-exp, the logit sum (label smoothing) and the cos argmax. The
  O(B x splits) partials are merged with a few O(B) torch ops. Saved: ||x||, ||w||, lse, target terms.
- backward: ONE kernel, programs over (row block, class block) tiles, row block fastest. Each
  recomputes its cosine tile once (1 GEMM-equivalent in all), forms dcos, and then, per chunk of D
  columns, adds its dx share (dcos @ w[cols, chunk], 1 GEMM-eq) and its dW share
  (dcos^T @ x[rows, chunk], 1 GEMM-eq), normalisation chain included, with fp32 atomic adds into
  fp32 buffers (B x D for dx, C x D for dW; with fp32 master weights that buffer is the gradient).
  Atomics were chosen over a two-stage reduction: a deterministic split of C for dx would need
  splits x B x D partials and one of B for dW splits x C x D (GBs at C = 1e6); the atomic order
  is not deterministic, so results vary in the last bits (the tests use tolerances).
- gradient filtering (``grad_filter``, off by default; Cut Cross-Entropy's rule): a tile whose
  softmax probabilities are all below eps and that holds no target skips both GEMMs (its dcos
  entries are below s*g*eps). Default eps = finfo(compute dtype).eps / 32: 2^-12 for bf16 (CCE's
  value), 2^-15 for fp16, 2^-28 for fp32 (a probability that small is below 1/32 of the dtype's
  rounding of an O(1) gradient term; the dots round dcos to that dtype anyway). With label smoothing
  the uniform term -eps_ls/C (on every entry, it would keep every tile) is removed from the tiles
  and added analytically: dx_i += -s g_i eps_ls/C (ws - xh_i (xh_i . ws)) / nx_i with ws = sum_j wh_j,
  dw_j += -s eps_ls/C (xg - wh_j (wh_j . xg)) / nw_j with xg = sum_i g_i xh_i (the target entry's
  slope dphi != 1 is corrected inside its tile). ws comes from a pass over W that also initialises
  dW with its term (one extra read of W, only when filtering with label smoothing).
  Caveat: early in training p ~ 1/C everywhere and most tiles fall under eps, so filtering drops
  the non-target gradient mass; that is why it is off by default.
- dtypes: x is fp32/bf16/fp16; w is x's dtype or fp32 (fp32 master weights under autocast: the
  kernels cast W tiles to x's dtype on load, so no C x D copy of W is made or kept). Dots in x's
  dtype (bf16/fp16 on tensor cores; fp32 as 3xTF32), all accumulation fp32.
- no host sync: the label range is checked on the device (an out-of-range label makes the loss NaN);
  the raising check (one ``aminmax`` + ``int``) runs for CPU tensors or with ``check_labels=True``.
Work per call: :func:`margin_ce_work` (GEMM-equivalents and bytes, forward and backward).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from facefuse.kernels._common import (
    INTERPRETING,
    check_float_dtype,
    check_same_device,
    check_tensor,
    dot_precision,
    pick_configs,
    sm_count,
    split_range,
)
from facefuse.kernels.margin import target_logit, target_slope

NORM_EPS = 1e-12  # F.normalize's eps
_SPLIT_GRANULE = 64 if INTERPRETING else 256  # classes per forward split are a multiple of this

# Autotune lists, checked by compiling offline (no GPU) for sm_89 (NVIDIA L40, ~99 KB shared memory
# per block) and sm_90 (H100/H200, ~227 KB): benchmarks/aot_compile_check.py. A config that does
# not fit a GPU fails to compile on it and the autotuner skips it.
# Spill-free on both targets with bf16 operands and with bf16 x / fp32 W (the 128 x 128 and 64 x 256
# forward tiles spilled once the norm sums were added; the 128 x 128 backward tile spills too).
_FWD_CONFIGS = pick_configs(
    [
        # BLOCK_B x BLOCK_C cosine tile, K loop over D in BLOCK_K steps         shared memory (bf16, sm_90)
        triton.Config({"BLOCK_B": 64, "BLOCK_C": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),  # 32 KB
        triton.Config({"BLOCK_B": 64, "BLOCK_C": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),  # 48 KB
        triton.Config({"BLOCK_B": 64, "BLOCK_C": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),  # 48 KB
        triton.Config({"BLOCK_B": 128, "BLOCK_C": 64, "BLOCK_K": 64}, num_warps=8, num_stages=3),  # 48 KB
        triton.Config({"BLOCK_B": 64, "BLOCK_C": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3),  # 16 KB, fp32
    ],
    triton.Config({"BLOCK_B": 16, "BLOCK_C": 32, "BLOCK_K": 32}, num_warps=1, num_stages=1),
)
# Backward: BLOCK_B x BLOCK_C cosine tile (K loop in BLOCK_K steps), then the dx / dW shares in
# chunks of BLOCK_D columns. The interpreter config is deliberately not a divisor of the test shapes.
_BWD_CONFIGS = pick_configs(
    [                                                                                      # smem sm_90 / sm_89
        triton.Config({"BLOCK_B": 64, "BLOCK_C": 64, "BLOCK_K": 64, "BLOCK_D": 32}, num_warps=4, num_stages=2),  # 32/32
        triton.Config({"BLOCK_B": 64, "BLOCK_C": 64, "BLOCK_K": 64, "BLOCK_D": 64}, num_warps=8, num_stages=3),  # 64/64
        triton.Config({"BLOCK_B": 64, "BLOCK_C": 128, "BLOCK_K": 64, "BLOCK_D": 32}, num_warps=8, num_stages=3),  # 72/72
        triton.Config({"BLOCK_B": 128, "BLOCK_C": 64, "BLOCK_K": 64, "BLOCK_D": 32}, num_warps=8, num_stages=3),  # 72/72
        triton.Config({"BLOCK_B": 64, "BLOCK_C": 128, "BLOCK_K": 32, "BLOCK_D": 32}, num_warps=8, num_stages=3),  # 72/72
        triton.Config({"BLOCK_B": 128, "BLOCK_C": 64, "BLOCK_K": 32, "BLOCK_D": 32}, num_warps=8, num_stages=3),  # 56/72
        triton.Config({"BLOCK_B": 64, "BLOCK_C": 64, "BLOCK_K": 32, "BLOCK_D": 32}, num_warps=4, num_stages=3),  # 32/40
    ],
    triton.Config({"BLOCK_B": 16, "BLOCK_C": 32, "BLOCK_K": 32, "BLOCK_D": 16}, num_warps=1, num_stages=1),
)
_LS_BLOCK_C, _LS_BLOCK_D = (16, 16) if INTERPRETING else (32, 128)  # label-smoothing pass over W


def filter_threshold(dtype: torch.dtype) -> float:
    """Default gradient-filter threshold for a compute dtype: ``finfo(dtype).eps / 32`` (bf16:
    2^-12, Cut Cross-Entropy's value; fp16: 2^-15; fp32: 2^-28)."""
    return torch.finfo(dtype).eps / 32


# ----------------------------------------------------------------------------------------------
# Work counts (a model of what the launchers below run; tested in tests/test_kernel_margin_ce.py)
# ----------------------------------------------------------------------------------------------
def margin_ce_work(B: int, C: int, D: int, *, x_dtype=torch.bfloat16, w_dtype=None, label_smoothing=0.0,
                   grad_filter=False, kept_fraction=1.0, need_dx=True, need_dw=True) -> dict:
    """GEMM-equivalents (1 = 2*B*C*D FLOPs) and DRAM bytes of one fused forward, one backward and
    both, as the launchers run them.

    ``kept_fraction``: the share of (row block, class block) tiles the gradient filter keeps (1.0:
    none skipped, the worst case; ignored without ``grad_filter``). Bytes assume, as the launch
    order is built for, that the programs sharing a W range run together so W tiles come from DRAM
    once per pass ("w_reads" counts those passes); x, the O(B)/O(C) vectors and the partials are
    small. fp32 atomic adds are counted in "atomic_adds" (elements) and, as DRAM traffic, as one
    read and one write of each fp32 buffer (the adds to one element are issued close in time and
    merge in L2): an estimate, not a measurement.
    """
    w_dtype = w_dtype or x_dtype
    xb, wb = torch.finfo(x_dtype).bits // 8, torch.finfo(w_dtype).bits // 8
    gemm = 2.0 * B * C * D
    kept = kept_fraction if grad_filter else 1.0
    analytic_ls = bool(grad_filter) and label_smoothing > 0

    fwd = dict(gemm_eq=1.0, w_reads=1, bytes=C * D * wb + B * D * xb + 4 * (B + C))
    # backward: recompute (1) + dx share (1) + dW share (1), the last two only on kept tiles
    gemm_bwd = 1.0 + kept * (int(need_dx) + int(need_dw))
    w_reads = 1 + (1 if (need_dx or need_dw) and kept > 0 else 0) + (1 if analytic_ls else 0)
    bwd_bytes = w_reads * C * D * wb + 2 * B * D * xb
    atomic = 0.0
    if need_dx:
        atomic += kept * B * D * math.ceil(C / 64)  # 64: the smallest BLOCK_C of the GPU configs
        bwd_bytes += 2 * 4 * B * D + B * D * xb  # fp32 buffer (zero, adds) + the cast to x's dtype
    if need_dw:
        atomic += kept * C * D * math.ceil(B / 64)
        bwd_bytes += 2 * 4 * C * D + 4 * C * D  # zero-fill + read-modify-write of the fp32 buffer
        if wb != 4:
            bwd_bytes += 4 * C * D + C * D * wb  # the cast to w's dtype
    bwd = dict(gemm_eq=gemm_bwd, w_reads=w_reads, bytes=bwd_bytes, atomic_adds=atomic)
    total = dict(gemm_eq=fwd["gemm_eq"] + bwd["gemm_eq"], w_reads=fwd["w_reads"] + bwd["w_reads"],
                 bytes=fwd["bytes"] + bwd["bytes"], atomic_adds=atomic)
    for part in (fwd, bwd, total):
        part["flops"] = part["gemm_eq"] * gemm
    return dict(fwd=fwd, bwd=bwd, total=total)


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _mm(a, b, acc, INTERP: tl.constexpr, DOT_PREC: tl.constexpr):
    # acc + a @ b; the interpreter computes bf16/fp16 dots wrongly, so it gets fp32 operands.
    if INTERP:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PREC)


@triton.jit
def _dcos_tile(dot, inv_nx, inv_nw, labels, cols, row_ok, col_ok, lse, zt, dphi, g, s, ls, ls_tile, ls_fix):
    # cos, dL/dcos and softmax p of one (row block, class block) tile, fp32, zero outside the masks.
    # ls_tile: the uniform label-smoothing term kept in the tile (eps_ls/C, or 0 when it is added
    # analytically); ls_fix: eps_ls/C in the analytic case, for the target entry's slope correction.
    ok = row_ok[:, None] & col_ok[None, :]
    cos = dot * inv_nx[:, None] * inv_nw[None, :]
    is_t = cols[None, :] == labels[:, None]
    z = tl.where(is_t, zt[:, None], s * cos)
    p = tl.exp(tl.where(ok, z - lse[:, None], float("-inf")))  # masked lanes: p = 0, no overflow
    slope = tl.where(is_t, dphi[:, None], 1.0)
    dz = (p - ls_tile - tl.where(is_t, 1.0 - ls, 0.0)) * slope - tl.where(is_t, ls_fix * (dphi[:, None] - 1.0), 0.0)
    dcos = tl.where(ok, g[:, None] * s * dz, 0.0)
    return cos, dcos, tl.where(ok & ~is_t, p, tl.where(ok, 1.0, 0.0))


@triton.jit
def _cos_tile(x_ptr, w_ptr, rows, cols, B, C, D, stride_xb, stride_wc,
              BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
              WITH_NORMS: tl.constexpr, INTERP: tl.constexpr, DOT_PREC: tl.constexpr):
    # x[rows] @ w[cols]^T over D in BLOCK_K steps (fp32), W tiles cast to x's dtype on load; with
    # WITH_NORMS also the squared norms of those rows of x and w from the same tiles. Rows/columns
    # past the end wrap around, so the loads stay in bounds without a row/column mask; callers mask.
    x_rows = x_ptr + (rows % B).to(tl.int64)[:, None] * stride_xb
    w_rows = w_ptr + (cols % C).to(tl.int64)[:, None] * stride_wc
    acc = tl.zeros((BLOCK_B, BLOCK_C), dtype=tl.float32)
    sx = tl.zeros((BLOCK_B,), dtype=tl.float32)
    sw = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < D
        xt = tl.load(x_rows + ks[None, :], mask=k_ok[None, :], other=0.0)
        wt = tl.load(w_rows + ks[None, :], mask=k_ok[None, :], other=0.0).to(x_ptr.dtype.element_ty)
        if WITH_NORMS:
            xf = xt.to(tl.float32)
            wf = wt.to(tl.float32)
            sx += tl.sum(xf * xf, axis=1)
            sw += tl.sum(wf * wf, axis=1)
        acc = _mm(xt, tl.trans(wt), acc, INTERP, DOT_PREC)
    return acc, sx, sw


@triton.autotune(configs=_FWD_CONFIGS, key=["B", "C", "D"])
@triton.jit
def _margin_ce_fwd_kernel(
    x_ptr, w_ptr, labels_ptr, zt_ptr,  # pointers: inputs (zt = s*phi)
    nx_ptr, nw_ptr,  # pointers: fp32 norm outputs (B, C)
    m_ptr, l_ptr, sz_ptr, best_ptr, arg_ptr,  # pointers: per (split, row) partials
    B, C, D, C_PER_SPLIT,  # shapes
    stride_xb, stride_wc,  # strides (unit stride along D)
    s, eps,  # scale, norm eps
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,  # meta
    INTERP: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=-1)
    zt = tl.load(zt_ptr + rows, mask=row_ok, other=0.0)
    m = tl.full((BLOCK_B,), float("-inf"), dtype=tl.float32)
    lsum = tl.zeros((BLOCK_B,), dtype=tl.float32)
    zsum = tl.zeros((BLOCK_B,), dtype=tl.float32)
    best = tl.full((BLOCK_B,), float("-inf"), dtype=tl.float32)
    arg = tl.zeros((BLOCK_B,), dtype=tl.int32)
    nx = tl.zeros((BLOCK_B,), dtype=tl.float32)
    c_begin = pid_s * C_PER_SPLIT
    c_end = tl.minimum(c_begin + C_PER_SPLIT, C)
    for c0 in range(c_begin, c_end, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        col_ok = cols < c_end
        acc, sx, sw = _cos_tile(x_ptr, w_ptr, rows, cols, B, C, D, stride_xb, stride_wc,
                                BLOCK_B, BLOCK_C, BLOCK_K, True, INTERP, DOT_PREC)
        # norms from the same tiles; row block 0 stores ||w|| of these classes
        nx = tl.sqrt(sx)
        nw = tl.sqrt(sw)
        tl.store(nw_ptr + cols, nw, mask=col_ok & (pid_b == 0))
        inv_nx = 1.0 / tl.maximum(nx, eps)
        inv_nw = 1.0 / tl.maximum(nw, eps)
        # cosines, margin logits, and the online log-sum-exp / logit sum / argmax updates
        cos = acc * inv_nx[:, None] * inv_nw[None, :]
        z = tl.where(cols[None, :] == labels[:, None], zt[:, None], s * cos)
        z = tl.where(col_ok[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        lsum = lsum * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m = m_new
        zsum += tl.sum(tl.where(col_ok[None, :], z, 0.0), axis=1)
        cos = tl.where(col_ok[None, :], cos, float("-inf"))
        blk_best = tl.max(cos, axis=1)
        blk_arg = tl.argmax(cos, axis=1).to(tl.int32) + c0
        better = blk_best > best
        best = tl.where(better, blk_best, best)
        arg = tl.where(better, blk_arg, arg)

    tl.store(nx_ptr + rows, nx, mask=row_ok & (pid_s == 0))
    out = pid_s * B + rows
    tl.store(m_ptr + out, m, mask=row_ok)
    tl.store(l_ptr + out, lsum, mask=row_ok)
    tl.store(sz_ptr + out, zsum, mask=row_ok)
    tl.store(best_ptr + out, best, mask=row_ok)
    tl.store(arg_ptr + out, arg, mask=row_ok)


@triton.autotune(configs=_BWD_CONFIGS, key=["B", "C", "D", "NEED_DX", "NEED_DW"])
@triton.jit
def _margin_ce_bwd_kernel(
    x_ptr, w_ptr, labels_ptr, nx_ptr, nw_ptr,  # pointers: inputs and their fp32 norms
    lse_ptr, zt_ptr, dphi_ptr, g_ptr,  # pointers: saved O(B) terms and per-row grad weights
    dx_ptr, dw_ptr,  # pointers: fp32 accumulators, B x D and C x D, contiguous
    B, C, D,  # shapes
    stride_xb, stride_wc,  # strides (unit stride along D)
    s, ls, ls_tile, ls_fix, eps, filt_eps,  # scale, label smoothing terms, norm eps, filter threshold
    NEED_DX: tl.constexpr, NEED_DW: tl.constexpr,  # meta: which gradients
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,  # meta: cos tile, K step
    BLOCK_D: tl.constexpr,  # meta: output columns per step of the share loop
    INTERP: tl.constexpr, DOT_PREC: tl.constexpr,
):
    # one (row block, class block) tile; row block fastest so the tiles of one class block run together
    n_rb = tl.cdiv(B, BLOCK_B)
    pid = tl.program_id(0)
    rows = (pid % n_rb) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = (pid // n_rb) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rows < B
    col_ok = cols < C
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=-1)
    nx = tl.load(nx_ptr + rows, mask=row_ok, other=1.0)
    nw = tl.load(nw_ptr + cols, mask=col_ok, other=1.0)
    inv_nx = 1.0 / tl.maximum(nx, eps)
    inv_nw = 1.0 / tl.maximum(nw, eps)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    zt = tl.load(zt_ptr + rows, mask=row_ok, other=0.0)
    dphi = tl.load(dphi_ptr + rows, mask=row_ok, other=0.0)
    g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)

    # the cosine tile, recomputed once, and its dL/dcos
    dot, _sx, _sw = _cos_tile(x_ptr, w_ptr, rows, cols, B, C, D, stride_xb, stride_wc,
                              BLOCK_B, BLOCK_C, BLOCK_K, False, INTERP, DOT_PREC)
    cos, dcos, p_or_1 = _dcos_tile(dot, inv_nx, inv_nw, labels, cols, row_ok, col_ok, lse, zt, dphi, g,
                                   s, ls, ls_tile, ls_fix)
    # gradient filter: skip the shares when every p < filt_eps and no target is in the tile
    if tl.max(tl.max(p_or_1, axis=1), axis=0) >= filt_eps:
        # projection sums of the normalisation chain (zero where the norm is below eps)
        rx = tl.where(nx >= eps, tl.sum(dcos * cos, axis=1), 0.0) * inv_nx
        rw = tl.where(nw >= eps, tl.sum(dcos * cos, axis=0), 0.0) * inv_nw
        a_dx = (dcos * inv_nw[None, :]).to(x_ptr.dtype.element_ty)  # dcos / ||w||, for dx
        a_dw = tl.trans((dcos * inv_nx[:, None]).to(x_ptr.dtype.element_ty))  # dcos^T / ||x||, for dW
        x_rows = x_ptr + (rows % B).to(tl.int64)[:, None] * stride_xb
        w_rows = w_ptr + (cols % C).to(tl.int64)[:, None] * stride_wc
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            d_ok = ds < D
            xo = tl.load(x_rows + ds[None, :], mask=d_ok[None, :], other=0.0)
            wo = tl.load(w_rows + ds[None, :], mask=d_ok[None, :], other=0.0)
            if NEED_DX:
                # dx_i += (sum_j dcos_ij wh_j - xh_i r_i) / ||x_i||
                gx = _mm(a_dx, wo.to(x_ptr.dtype.element_ty), tl.zeros((BLOCK_B, BLOCK_D), dtype=tl.float32),
                         INTERP, DOT_PREC)
                gx = (gx - xo.to(tl.float32) * rx[:, None]) * inv_nx[:, None]
                tl.atomic_add(dx_ptr + rows.to(tl.int64)[:, None] * D + ds[None, :], gx,
                              mask=row_ok[:, None] & d_ok[None, :], sem="relaxed")
            if NEED_DW:
                # dw_j += (sum_i dcos_ij xh_i - wh_j r_j) / ||w_j||
                gw = _mm(a_dw, xo, tl.zeros((BLOCK_C, BLOCK_D), dtype=tl.float32), INTERP, DOT_PREC)
                gw = (gw - wo.to(tl.float32) * rw[:, None]) * inv_nw[:, None]
                tl.atomic_add(dw_ptr + cols.to(tl.int64)[:, None] * D + ds[None, :], gw,
                              mask=col_ok[:, None] & d_ok[None, :], sem="relaxed")


@triton.jit
def _ls_pass_kernel(
    w_ptr, nw_ptr, xg_ptr,  # pointers: weight, its fp32 norms, xg = sum_i g_i xh_i (fp32, D)
    dw_ptr, ws_ptr,  # pointers: fp32 C x D dW buffer to initialise, fp32 D accumulator of sum_j wh_j
    C, D, stride_wc,  # shapes, strides
    coef, eps,  # -s * eps_ls / C, norm eps
    WRITE_DW: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,  # meta
):
    # label smoothing's uniform term for a block of classes: dw_j = coef (xg - wh_j (wh_j . xg)) / ||w_j||
    # written as dW's initial value, and this block's share of ws = sum_j wh_j
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    nw = tl.load(nw_ptr + cols, mask=col_ok, other=1.0)
    inv_nw = 1.0 / tl.maximum(nw, eps)
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_wc
    proj = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):  # wh_j . xg, and the ws share
        ds = d0 + tl.arange(0, BLOCK_D)
        d_ok = ds < D
        wh = tl.load(w_rows + ds[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        wh = wh * inv_nw[:, None]
        xg = tl.load(xg_ptr + ds, mask=d_ok, other=0.0)
        proj += tl.sum(wh * xg[None, :], axis=1)
        tl.atomic_add(ws_ptr + ds, tl.sum(wh, axis=0), mask=d_ok, sem="relaxed")
    if WRITE_DW:
        proj = tl.where(nw >= eps, proj, 0.0)
        for d0 in range(0, D, BLOCK_D):  # the same rows again (L1/L2)
            ds = d0 + tl.arange(0, BLOCK_D)
            d_ok = ds < D
            wh = tl.load(w_rows + ds[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            xg = tl.load(xg_ptr + ds, mask=d_ok, other=0.0)
            val = coef * (xg[None, :] - wh * inv_nw[:, None] * proj[:, None]) * inv_nw[:, None]
            tl.store(dw_ptr + cols.to(tl.int64)[:, None] * D + ds[None, :], val, mask=col_ok[:, None] & d_ok[None, :])


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
def _target_terms(x, weight, labels, s, m1, m2, m3, easy_margin):
    """Target logit ``s*phi`` and ``dphi/dcos`` per row (fp32, O(B)), computed in float64 so that
    the branch and clamp decisions are taken on exact values (kernels/margin.py). W rows are rounded
    to x's dtype first, as the kernels read them."""
    x64 = x.double()
    wy64 = weight.index_select(0, labels).to(x.dtype).double()
    nx = torch.linalg.vector_norm(x64, dim=1).clamp_min(NORM_EPS)
    nw = torch.linalg.vector_norm(wy64, dim=1).clamp_min(NORM_EPS)
    cos_t = (x64 * wy64).sum(dim=1) / (nx * nw)
    phi = target_logit(cos_t, m1, m2, m3, easy_margin)
    slope = target_slope(cos_t, m1, m2, m3, easy_margin)
    return (s * phi).float(), slope.float()


def _partials(x, weight, labels, zt, s):
    """One launch of the forward kernel over all of ``weight``'s classes, merged over the splits:
    per row ``(nx, nw, m, l, zsum, best, column)`` with ``m`` the row's max logit, ``l = sum_j
    exp(z_ij - m)``, ``zsum = sum_j z_ij``, ``best`` the max cos and ``column`` its (first) class.
    ``labels`` marks each row's target column (``-1``: none in ``weight``), ``zt`` its logit."""
    B, D = x.shape
    C = weight.shape[0]
    n_splits, per_split = split_range(C, triton.cdiv(B, 64), 4 * sm_count(x.device), _SPLIT_GRANULE)
    f32 = dict(device=x.device, dtype=torch.float32)
    nx, nw = torch.empty(B, **f32), torch.empty(C, **f32)
    part_m, part_l, part_sz, part_best = (torch.empty(n_splits, B, **f32) for _ in range(4))
    part_arg = torch.empty(n_splits, B, device=x.device, dtype=torch.int32)
    grid = lambda meta: (triton.cdiv(B, meta["BLOCK_B"]), n_splits)  # noqa: E731
    _margin_ce_fwd_kernel[grid](
        x, weight, labels, zt, nx, nw,
        part_m, part_l, part_sz, part_best, part_arg,
        B, C, D, per_split, x.stride(0), weight.stride(0), float(s), NORM_EPS,
        INTERP=INTERPRETING, DOT_PREC=dot_precision(x.dtype),
    )
    # merge the per-split partials (O(B x splits))
    m = part_m.max(dim=0).values
    lsum = (part_l * torch.exp(part_m - m)).sum(dim=0)
    first_best = part_best.argmax(dim=0, keepdim=True)  # first split holding the max: lowest index
    best = part_best.gather(0, first_best).squeeze(0)
    column = part_arg.gather(0, first_best).squeeze(0).long()
    return nx, nw, m, lsum, part_sz.sum(dim=0), best, column


def _forward(x, weight, labels, s, m1, m2, m3, easy_margin, ls):
    C = weight.shape[0]
    # out-of-range labels (only possible with check_labels off): computed on a clamped copy, NaN loss
    bad = ((labels < 0) | (labels >= C)).any()
    safe = labels.clamp(0, C - 1)
    zt, dphi = _target_terms(x, weight, safe, s, m1, m2, m3, easy_margin)
    nx, nw, m, lsum, zsum, _best, preds = _partials(x, weight, labels, zt, s)
    lse = m + torch.log(lsum)
    per_row = lse - (1.0 - ls) * zt - (ls / C) * zsum
    per_row = torch.where(bad, float("nan"), per_row)
    return per_row, preds, (nx, nw, lse, zt, dphi)


def _backward(x, weight, labels, saved, g, s, ls, need_dx, need_dw, filt_eps, num_classes=None):
    """dx (x's dtype) and dW (weight's dtype) of the fused loss; ``filt_eps`` None: no filtering.
    ``num_classes``: the softmax's class count (label smoothing's C) when ``weight`` is one shard."""
    nx, nw, lse, zt, dphi = saved
    B, D = x.shape
    C = weight.shape[0]
    n_cls = num_classes or C
    f32 = dict(device=x.device, dtype=torch.float32)
    analytic = filt_eps is not None and ls > 0
    dx = torch.zeros(B, D, **f32) if need_dx else None
    dw = (torch.empty if analytic and need_dw else torch.zeros)(C, D, **f32) if need_dw else None
    ws = None
    if analytic:  # label smoothing's uniform term: dW's initial value and ws = sum_j wh_j
        inv_nx = 1.0 / nx.clamp_min(NORM_EPS)
        xg = ((g * inv_nx)[:, None] * x.float()).sum(dim=0)
        ws = torch.zeros(D, **f32)
        _ls_pass_kernel[(triton.cdiv(C, _LS_BLOCK_C),)](
            weight, nw, xg, dw if need_dw else ws, ws, C, D, weight.stride(0), -float(s) * ls / n_cls, NORM_EPS,
            WRITE_DW=bool(need_dw), BLOCK_C=_LS_BLOCK_C, BLOCK_D=_LS_BLOCK_D)
    grid = lambda m: (triton.cdiv(B, m["BLOCK_B"]) * triton.cdiv(C, m["BLOCK_C"]),)  # noqa: E731
    _margin_ce_bwd_kernel[grid](
        x, weight, labels, nx, nw, lse, zt, dphi, g,
        dx if need_dx else x, dw if need_dw else x,
        B, C, D, x.stride(0), weight.stride(0),
        float(s), float(ls), 0.0 if analytic else ls / n_cls, ls / n_cls if analytic else 0.0, NORM_EPS,
        -1.0 if filt_eps is None else float(filt_eps),
        NEED_DX=bool(need_dx), NEED_DW=bool(need_dw), INTERP=INTERPRETING, DOT_PREC=dot_precision(x.dtype),
    )
    if need_dx and analytic:  # dx_i += -s g_i eps_ls/C (ws - xh_i (xh_i . ws)) / ||x_i||
        inv_nx = 1.0 / nx.clamp_min(NORM_EPS)
        xh = x.float() * inv_nx[:, None]
        proj = torch.where(nx >= NORM_EPS, xh @ ws, 0.0)
        dx += (-float(s) * ls / n_cls * g * inv_nx)[:, None] * (ws[None, :] - xh * proj[:, None])
    return (dx.to(x.dtype) if need_dx else None), (dw.to(weight.dtype) if need_dw else None)


class _MarginCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, labels, s, m1, m2, m3, easy_margin, ls, filt_eps):
        per_row, preds, saved = _forward(x, weight, labels, s, m1, m2, m3, easy_margin, ls)
        ctx.save_for_backward(x, weight, labels, *saved)
        ctx.hyper = (s, ls, filt_eps)
        ctx.mark_non_differentiable(preds)
        ctx.set_materialize_grads(False)
        return per_row.mean(), per_row, preds

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_mean, g_row, _g_preds):
        x, weight, labels, *saved = ctx.saved_tensors
        if g_mean is None and g_row is None:
            return (None,) * 10
        B = x.shape[0]
        g = torch.zeros(B, device=x.device, dtype=torch.float32)
        if g_mean is not None:
            g += g_mean.float() / B
        if g_row is not None:
            g += g_row.float()
        s, ls, filt_eps = ctx.hyper
        dx, dw = _backward(x, weight, labels, saved, g, s, ls, *ctx.needs_input_grad[:2], filt_eps)
        return dx, dw, None, None, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------
def _check_hyper(s, m1, m2, m3, label_smoothing):
    if not s > 0:
        raise ValueError(f"s must be > 0, got {s}")
    if not m1 > 0:
        raise ValueError(f"m1 must be > 0, got {m1}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    for name, v in (("m2", m2), ("m3", m3)):
        if not math.isfinite(v):
            raise ValueError(f"{name} must be finite, got {v}")


def _check_shapes(x, weight, labels):
    for name, t in (("x", x), ("weight", weight), ("labels", labels)):
        check_tensor(t, name)
    if x.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"x and weight must be 2-D (B x D, C x D), got {tuple(x.shape)} and {tuple(weight.shape)}")
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"feature sizes differ: x is B x {x.shape[1]}, weight is C x {weight.shape[1]}")
    if 0 in x.shape or 0 in weight.shape:
        raise ValueError(f"empty input: x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must be int64 or int32, got {labels.dtype}")
    if labels.shape != (x.shape[0],):
        raise ValueError(f"labels must have shape ({x.shape[0]},), got {tuple(labels.shape)}")


def _check_operands(x, weight, labels):
    """What the kernels need of their operands: shapes, x float (fp32/bf16/fp16) and weight in x's
    dtype or fp32, one device, rows contiguous along D."""
    _check_shapes(x, weight, labels)
    check_float_dtype(x, "x")
    if weight.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"weight must share x's dtype or be float32, got x {x.dtype} and weight {weight.dtype}")
    check_same_device({"x": x, "weight": weight, "labels": labels})
    for name, t in (("x", x), ("weight", weight)):
        if t.stride(1) != 1:
            raise ValueError(f"{name} must have contiguous rows (stride(1) == 1), got strides {t.stride()}")


def _check_label_range(labels, weight):
    lo, hi = (int(v) for v in torch.aminmax(labels))  # one host sync
    if lo < 0 or hi >= weight.shape[0]:
        raise ValueError(f"labels must be in [0, {weight.shape[0]}), got values in [{lo}, {hi}]")


def _pack(mean, per_row, preds, return_per_row, return_preds):
    if not (return_per_row or return_preds):
        return mean
    return mean, (per_row if return_per_row else None), (preds if return_preds else None)


def _filter_eps(grad_filter, dtype):
    if grad_filter is False or grad_filter is None:
        return None
    if grad_filter is True:
        return filter_threshold(dtype)
    eps = float(grad_filter)
    if not 0.0 < eps < 1.0:
        raise ValueError(f"grad_filter must be a bool or a threshold in (0, 1), got {grad_filter}")
    return eps


def margin_cross_entropy(x, weight, labels, *, s=64.0, m1=1.0, m2=0.5, m3=0.0, easy_margin=False,
                         label_smoothing=0.0, return_per_row=False, return_preds=False,
                         grad_filter=False, check_labels=None):
    """Fused Triton combined-margin cross-entropy; see the module docstring for the exact math and
    kernels/margin.py for the target logit (``easy_margin``: insightface's ``cos > 0`` rule).

    ``x`` B x D (fp32, bf16 or fp16) and ``weight`` C x D in x's dtype or fp32 (fp32 master weights
    under autocast are read as they are, tiles cast on load), same device, unit stride along D;
    ``labels`` int64/int32 of shape B in [0, C). Returns the mean loss (fp32 scalar), or with
    ``return_per_row`` / ``return_preds`` the tuple ``(mean, per_row fp32 [B] or None, preds int64
    [B] or None)``. Differentiable w.r.t. ``x`` and ``weight``; gradients come back in their dtypes.

    ``grad_filter``: False (default) computes the exact gradient; True skips the backward's tiles
    whose softmax probabilities are all below :func:`filter_threshold` of x's dtype (and that hold no
    target), a float sets that threshold. ``check_labels``: raise ValueError on a label outside
    [0, C) (one host sync); None (default) does so for CPU tensors only. On the device without it,
    out-of-range labels make the loss NaN instead (checked on the device, no sync).
    """
    _check_operands(x, weight, labels)
    _check_hyper(s, m1, m2, m3, label_smoothing)
    filt_eps = _filter_eps(grad_filter, x.dtype)
    if check_labels or (check_labels is None and labels.device.type == "cpu"):
        _check_label_range(labels, weight)
    mean, per_row, preds = _MarginCrossEntropy.apply(
        x, weight, labels.long().contiguous(), float(s), float(m1), float(m2), float(m3), bool(easy_margin),
        float(label_smoothing), filt_eps)
    return _pack(mean, per_row, preds, return_per_row, return_preds)


@dataclass
class ShardPartials:
    """One class shard's part of :func:`margin_cross_entropy`, per row of the (gathered) batch.

    ``m``: max over the shard's logits z; ``l``: sum over the shard of exp(z - m); ``zt``: the
    margin-adjusted target logit s*phi (0 where another shard owns the label); ``zsum``: sum of the
    shard's z; ``best`` / ``column``: max cos (no margin) and its column in the shard. ``saved``:
    what :func:`margin_ce_shard_backward` needs besides the global log-sum-exp."""

    m: torch.Tensor
    l: torch.Tensor
    zt: torch.Tensor
    zsum: torch.Tensor
    best: torch.Tensor
    column: torch.Tensor
    saved: tuple


def margin_ce_shard_forward(x, weight, target, *, s, m1, m2, m3, easy_margin) -> ShardPartials:
    """The fused forward over one shard of the class centres (a model-parallel head,
    ``trainer/sharded_head.py``), with no B x C_shard tensor: ``target`` holds each row's label as
    a column of ``weight``, or -1 where another shard owns it. The caller combines the shards'
    partials (``lse = M + log sum_shards l exp(m - M)``, M the max of the m's) and calls
    :func:`margin_ce_shard_backward` with that global ``lse``. Not differentiable itself."""
    _check_operands(x, weight, target)
    target = target.long().contiguous()
    owned = target >= 0
    zt, dphi = _target_terms(x, weight, target.clamp(0, weight.shape[0] - 1), s, m1, m2, m3, easy_margin)
    zt, dphi = torch.where(owned, zt, 0.0), torch.where(owned, dphi, 0.0)
    nx, nw, m, lsum, zsum, best, column = _partials(x, weight, target, zt, s)
    return ShardPartials(m, lsum, zt, zsum, best, column, (target, nx, nw, zt, dphi))


def margin_ce_shard_backward(x, weight, partials: ShardPartials, lse, g, *, s, label_smoothing, num_classes,
                             need_dx=True, need_dw=True):
    """dx and dW of one shard's part of the loss ``mean_i [lse_i - (1-eps) z_iy - eps/C sum_j z_ij]``
    given the global ``lse`` (B), per-row gradient weights ``g`` (B, e.g. 1/B) and the softmax's
    total class count ``num_classes`` (C of all shards). dx is this shard's share only: the
    caller sums the shards' shares (the embeddings' all-gather does, in its backward)."""
    target, nx, nw, zt, dphi = partials.saved
    return _backward(x, weight, target, (nx, nw, lse.float().contiguous(), zt, dphi), g.float().contiguous(),
                     float(s), float(label_smoothing), need_dx, need_dw, None, num_classes=float(num_classes))


def margin_cross_entropy_reference(x, weight, labels, *, s=64.0, m1=1.0, m2=0.5, m3=0.0, easy_margin=False,
                                   label_smoothing=0.0, return_per_row=False, return_preds=False):
    """Pure-PyTorch combined-margin cross-entropy (plain autograd), the oracle of the fused kernel.

    Same signature and returns as :func:`margin_cross_entropy`; computes in
    ``promote_types(x.dtype, float32)`` (fp32 for bf16/fp16 inputs, float64 for float64).
    """
    _check_shapes(x, weight, labels)
    _check_label_range(labels, weight)
    _check_hyper(s, m1, m2, m3, label_smoothing)
    dt = torch.promote_types(x.dtype, torch.float32)
    labels = labels.long()
    C = weight.shape[0]
    cos = F.linear(F.normalize(x.to(dt), dim=1), F.normalize(weight.to(dt), dim=1))
    phi = target_logit(cos.gather(1, labels[:, None]).squeeze(1), m1, m2, m3, easy_margin)
    is_target = torch.arange(C, device=labels.device)[None, :] == labels[:, None]
    z = s * torch.where(is_target, phi[:, None], cos)
    per_row = (torch.logsumexp(z, dim=1) - (1.0 - label_smoothing) * s * phi
               - (label_smoothing / C) * z.sum(dim=1))
    preds = cos.detach().argmax(dim=1)
    return _pack(per_row.mean(), per_row, preds, return_per_row, return_preds)
