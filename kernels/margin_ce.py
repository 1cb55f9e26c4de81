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
    Named settings (NormFace, ArcFace, CosFace, SphereFace): kernels/margin.py, MARGINS.

Design of the fused path. The target logit is an O(B) quantity: the launcher gathers w_y and computes
cos_iy, phi and dphi/dc on the host in float64 (so the margin branch and the clamp decisions are taken
on exact values). The kernels never write a B x C tensor:

- forward: programs over (row block, class split); each runs a K-looped tile GEMM x @ w^T, scales
  by 1/||x||, 1/||w|| (O(B), O(C) vectors), substitutes the target logit and keeps an online
  log-sum-exp, the logit sum (label smoothing) and the cos argmax. The O(B x splits) partials are
  merged on the host. Saved for backward: lse, the norms, the target terms (all O(B) or O(C)).
- backward dx: programs over (row block, class split, column chunk of D) recompute the cos tile,
  form dcos and accumulate dcos @ wh[:, chunk] over their classes; the per-split partials
  (splits x B x D, fp32) are summed on the host: deterministic, no atomics.
- backward dW: programs over (class block, column chunk of D) own their rows of dW, loop over all
  rows of x, and write dW in the input dtype directly (normalisation chain fused): no C x D fp32
  buffer. Column chunks (BLOCK_DO) bound the accumulators for any D; when D > BLOCK_DO the cos
  tiles are recomputed once per chunk (the autotuner weighs that against tile size).
All accumulation is fp32; bf16/fp16 operands go to tensor cores as they are, fp32 operands as 3xTF32
(near-fp32 accuracy).
"""

from __future__ import annotations

import math

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
_SPLIT_GRANULE = 64 if INTERPRETING else 256  # classes per split are a multiple of this
_MAX_DX_SPLITS = 32  # bounds the splits x B x D fp32 partial buffer of the dx kernel

# Autotune lists, checked by compiling offline (no GPU) for sm_89 (NVIDIA L40, ~99 KB shared memory
# per block) and sm_90 (H100/H200, ~227 KB). Comments give the shared memory each needs there (bf16,
# D=512); a config that does not fit a GPU fails to compile on it and the autotuner skips it.
# fp32 operands (3xTF32) need 1.5-3x more: on the L40 only the 64 x 64 forward tiles fit then.
_FWD_CONFIGS = pick_configs(
    [
        # BLOCK_B x BLOCK_C cosine tile, K loop over D in BLOCK_K steps
        triton.Config({"BLOCK_B": 64, "BLOCK_C": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),  # L40 32K / H 48K
        triton.Config({"BLOCK_B": 64, "BLOCK_C": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),  # L40 48K / H 64K
        triton.Config({"BLOCK_B": 64, "BLOCK_C": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),  # L40 48K / H 72K
        triton.Config({"BLOCK_B": 128, "BLOCK_C": 64, "BLOCK_K": 64}, num_warps=8, num_stages=3),  # L40 48K / H 72K
        triton.Config({"BLOCK_B": 128, "BLOCK_C": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),  # L40 64K / H 96K
        triton.Config({"BLOCK_B": 128, "BLOCK_C": 128, "BLOCK_K": 64}, num_warps=8, num_stages=4),  # L40 96K / H 128K
        triton.Config({"BLOCK_B": 64, "BLOCK_C": 256, "BLOCK_K": 64}, num_warps=8, num_stages=3),  # L40 80K / H 120K
        triton.Config({"BLOCK_B": 64, "BLOCK_C": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3),  # fp32 L40 48K/H 56K
    ],
    triton.Config({"BLOCK_B": 16, "BLOCK_C": 32, "BLOCK_K": 32}, num_warps=1, num_stages=1),
)
# Backward: BLOCK_B x BLOCK_C cosine tile (K loop in BLOCK_K steps) and BLOCK_DO output columns per
# program (D / BLOCK_DO programs share, and recompute, each cosine tile). bf16 at D=512: all fit both
# GPUs without spilling (<= 66 KB on either); fp32 spills in most, except the BLOCK_K=32 ones.
_BWD_CONFIGS = [
    triton.Config({"BLOCK_B": 32, "BLOCK_C": 32, "BLOCK_K": 64, "BLOCK_DO": 512}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_B": 16, "BLOCK_C": 64, "BLOCK_K": 64, "BLOCK_DO": 512}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_B": 64, "BLOCK_C": 32, "BLOCK_K": 64, "BLOCK_DO": 256}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_B": 32, "BLOCK_C": 64, "BLOCK_K": 64, "BLOCK_DO": 256}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_B": 64, "BLOCK_C": 64, "BLOCK_K": 32, "BLOCK_DO": 256}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_B": 64, "BLOCK_C": 64, "BLOCK_K": 64, "BLOCK_DO": 128}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_B": 32, "BLOCK_C": 32, "BLOCK_K": 64, "BLOCK_DO": 128}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_B": 32, "BLOCK_C": 32, "BLOCK_K": 32, "BLOCK_DO": 128}, num_warps=4, num_stages=2),  # fp32
]
_BWD_INTERP_CONFIG = triton.Config({"BLOCK_B": 16, "BLOCK_C": 32, "BLOCK_K": 32, "BLOCK_DO": 32}, num_warps=1,
                                   num_stages=1)
_BWD_DX_CONFIGS = pick_configs(_BWD_CONFIGS, _BWD_INTERP_CONFIG)
_BWD_DW_CONFIGS = pick_configs(_BWD_CONFIGS, _BWD_INTERP_CONFIG)
_NORM_BLOCK_R, _NORM_BLOCK_D = (16, 32) if INTERPRETING else (16, 128)


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _row_norm_kernel(
    a_ptr, out_ptr,  # pointers: R x D input (row stride, unit column stride), R fp32 output
    R, D,  # shapes
    stride_r,  # strides
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,  # meta
):
    # ||a_r||_2 in fp32 for a block of rows, looping over D.
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        ptrs = a_ptr + rows.to(tl.int64)[:, None] * stride_r + ds[None, :]
        v = tl.load(ptrs, mask=row_ok[:, None] & (ds < D)[None, :], other=0.0).to(tl.float32)
        acc += v * v
    tl.store(out_ptr + rows, tl.sqrt(tl.sum(acc, axis=1)), mask=row_ok)


@triton.jit
def _mm(a, b, acc, INTERP: tl.constexpr, DOT_PREC: tl.constexpr):
    # acc + a @ b; the interpreter computes bf16/fp16 dots wrongly, so it gets fp32 operands.
    if INTERP:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PREC)


@triton.jit
def _dcos_tile(dot, inv_nx, inv_nw, labels, cols, row_ok, col_ok, lse, zt, dphi, g, s, ls, ls_c):
    # cos tile and dL/dcos tile of one (row block, class block), both fp32, zero outside the masks.
    ok = row_ok[:, None] & col_ok[None, :]
    cos = dot * inv_nx[:, None] * inv_nw[None, :]
    is_t = cols[None, :] == labels[:, None]
    z = tl.where(is_t, zt[:, None], s * cos)
    p = tl.exp(tl.where(ok, z - lse[:, None], float("-inf")))  # masked lanes: p = 0, no overflow
    dz = g[:, None] * (p - ls_c - tl.where(is_t, 1.0 - ls, 0.0))
    dcos = tl.where(ok, dz * s * tl.where(is_t, dphi[:, None], 1.0), 0.0)
    return cos, dcos


@triton.jit
def _cos_tile(x_ptr, w_ptr, rows, cols, B, C, D, stride_xb, stride_wc,
              BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
              INTERP: tl.constexpr, DOT_PREC: tl.constexpr):
    # x[rows] @ w[cols]^T over D in BLOCK_K steps (fp32). Rows/columns past the end wrap around, so
    # the loads stay in bounds without a row/column mask; callers mask the results.
    x_rows = x_ptr + (rows % B).to(tl.int64)[:, None] * stride_xb
    w_rows = w_ptr + (cols % C).to(tl.int64)[:, None] * stride_wc
    acc = tl.zeros((BLOCK_B, BLOCK_C), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < D
        xt = tl.load(x_rows + ks[None, :], mask=k_ok[None, :], other=0.0)
        wt = tl.load(w_rows + ks[None, :], mask=k_ok[None, :], other=0.0)
        acc = _mm(xt, tl.trans(wt), acc, INTERP, DOT_PREC)
    return acc


@triton.autotune(configs=_FWD_CONFIGS, key=["B", "C", "D"])
@triton.jit
def _margin_ce_fwd_kernel(
    x_ptr, w_ptr, labels_ptr, inv_nx_ptr, inv_nw_ptr, zt_ptr,  # pointers: inputs (zt = s*phi)
    m_ptr, l_ptr, sz_ptr, best_ptr, arg_ptr,  # pointers: per (split, row) partials
    B, C, D, C_PER_SPLIT,  # shapes
    stride_xb, stride_wc,  # strides (unit stride along D)
    s,  # scale
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,  # meta
    INTERP: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=-1)
    inv_nx = tl.load(inv_nx_ptr + rows, mask=row_ok, other=0.0)
    zt = tl.load(zt_ptr + rows, mask=row_ok, other=0.0)
    m = tl.full((BLOCK_B,), float("-inf"), dtype=tl.float32)
    lsum = tl.zeros((BLOCK_B,), dtype=tl.float32)
    zsum = tl.zeros((BLOCK_B,), dtype=tl.float32)
    best = tl.full((BLOCK_B,), float("-inf"), dtype=tl.float32)
    arg = tl.zeros((BLOCK_B,), dtype=tl.int32)
    c_begin = pid_s * C_PER_SPLIT
    c_end = tl.minimum(c_begin + C_PER_SPLIT, C)
    for c0 in range(c_begin, c_end, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        col_ok = cols < c_end
        acc = _cos_tile(x_ptr, w_ptr, rows, cols, B, C, D, stride_xb, stride_wc,
                        BLOCK_B, BLOCK_C, BLOCK_K, INTERP, DOT_PREC)
        # cosines, margin logits, and the online log-sum-exp / logit sum / argmax updates
        inv_nw = tl.load(inv_nw_ptr + cols, mask=col_ok, other=0.0)
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

    out = pid_s * B + rows
    tl.store(m_ptr + out, m, mask=row_ok)
    tl.store(l_ptr + out, lsum, mask=row_ok)
    tl.store(sz_ptr + out, zsum, mask=row_ok)
    tl.store(best_ptr + out, best, mask=row_ok)
    tl.store(arg_ptr + out, arg, mask=row_ok)


def _prune_by_dim(configs, nargs, **kwargs):
    """Drop backward configs whose output chunk BLOCK_DO is wider than D needs (keep the narrowest)."""
    need = max(16, triton.next_power_of_2(nargs["D"]))
    kept = [c for c in configs if c.kwargs["BLOCK_DO"] <= need]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_DO"])]


@triton.autotune(configs=_BWD_DX_CONFIGS, key=["B", "C", "D"], prune_configs_by={"early_config_prune": _prune_by_dim})
@triton.jit
def _margin_ce_bwd_dx_kernel(
    x_ptr, w_ptr, labels_ptr, nx_ptr, inv_nw_ptr,  # pointers: inputs
    lse_ptr, zt_ptr, dphi_ptr, g_ptr,  # pointers: saved O(B) terms and per-row grad weights
    dx_ptr,  # pointer: splits x B x D fp32 partial dx
    B, C, D, C_PER_SPLIT,  # shapes
    stride_xb, stride_wc,  # strides (unit stride along D)
    s, ls, ls_c, eps,  # scale, label smoothing, label smoothing / C, norm eps
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,  # meta: cos tile, K step
    BLOCK_DO: tl.constexpr,  # meta: output columns per program (grid axis 2)
    INTERP: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    ds = tl.program_id(2) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    d_ok = ds < D
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=-1)
    nx = tl.load(nx_ptr + rows, mask=row_ok, other=1.0)
    inv_nx = 1.0 / tl.maximum(nx, eps)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    zt = tl.load(zt_ptr + rows, mask=row_ok, other=0.0)
    dphi = tl.load(dphi_ptr + rows, mask=row_ok, other=0.0)
    g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)

    # G[:, ds] = sum_j dcos_ij wh_j[ds] and r = sum_j dcos_ij cos_ij over this split's classes
    acc = tl.zeros((BLOCK_B, BLOCK_DO), dtype=tl.float32)
    r = tl.zeros((BLOCK_B,), dtype=tl.float32)
    c_begin = pid_s * C_PER_SPLIT
    c_end = tl.minimum(c_begin + C_PER_SPLIT, C)
    for c0 in range(c_begin, c_end, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        col_ok = cols < c_end
        dot = _cos_tile(x_ptr, w_ptr, rows, cols, B, C, D, stride_xb, stride_wc,
                        BLOCK_B, BLOCK_C, BLOCK_K, INTERP, DOT_PREC)
        inv_nw = tl.load(inv_nw_ptr + cols, mask=col_ok, other=0.0)
        cos, dcos = _dcos_tile(dot, inv_nx, inv_nw, labels, cols, row_ok, col_ok, lse, zt, dphi, g,
                               s, ls, ls_c)
        r += tl.sum(dcos * cos, axis=1)
        wo = tl.load(w_ptr + (cols % C).to(tl.int64)[:, None] * stride_wc + ds[None, :],
                     mask=d_ok[None, :], other=0.0)
        acc = _mm((dcos * inv_nw[None, :]).to(wo.dtype), wo, acc, INTERP, DOT_PREC)

    # normalisation chain: dx = (G - xh (xh . G)) / max(||x||, eps), xh . G = r
    xo = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_xb + ds[None, :],
                 mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    r = tl.where(nx >= eps, r, 0.0)
    dx = (acc - xo.to(tl.float32) * (inv_nx * r)[:, None]) * inv_nx[:, None]
    out = (pid_s * B + rows).to(tl.int64)[:, None] * D + ds[None, :]
    tl.store(dx_ptr + out, dx, mask=row_ok[:, None] & d_ok[None, :])


@triton.autotune(configs=_BWD_DW_CONFIGS, key=["B", "C", "D"], prune_configs_by={"early_config_prune": _prune_by_dim})
@triton.jit
def _margin_ce_bwd_dw_kernel(
    x_ptr, w_ptr, labels_ptr, nx_ptr, nw_ptr,  # pointers: inputs
    lse_ptr, zt_ptr, dphi_ptr, g_ptr,  # pointers: saved O(B) terms and per-row grad weights
    dw_ptr,  # pointer: C x D output, weight dtype, contiguous
    B, C, D,  # shapes
    stride_xb, stride_wc,  # strides (unit stride along D)
    s, ls, ls_c, eps,  # scale, label smoothing, label smoothing / C, norm eps
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,  # meta: cos tile, K step
    BLOCK_DO: tl.constexpr,  # meta: output columns per program (grid axis 1)
    INTERP: tl.constexpr, DOT_PREC: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    ds = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    d_ok = ds < D
    nw = tl.load(nw_ptr + cols, mask=col_ok, other=1.0)
    inv_nw = 1.0 / tl.maximum(nw, eps)

    # H[:, ds] = sum_i dcos_ij xh_i[ds] and r = sum_i dcos_ij cos_ij over all rows
    acc = tl.zeros((BLOCK_C, BLOCK_DO), dtype=tl.float32)
    r = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        row_ok = rows < B
        labels = tl.load(labels_ptr + rows, mask=row_ok, other=-1)
        nx = tl.load(nx_ptr + rows, mask=row_ok, other=1.0)
        inv_nx = 1.0 / tl.maximum(nx, eps)
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        zt = tl.load(zt_ptr + rows, mask=row_ok, other=0.0)
        dphi = tl.load(dphi_ptr + rows, mask=row_ok, other=0.0)
        g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
        dot = _cos_tile(x_ptr, w_ptr, rows, cols, B, C, D, stride_xb, stride_wc,
                        BLOCK_B, BLOCK_C, BLOCK_K, INTERP, DOT_PREC)
        cos, dcos = _dcos_tile(dot, inv_nx, inv_nw, labels, cols, row_ok, col_ok, lse, zt, dphi, g,
                               s, ls, ls_c)
        r += tl.sum(dcos * cos, axis=0)
        xo = tl.load(x_ptr + (rows % B).to(tl.int64)[:, None] * stride_xb + ds[None, :],
                     mask=d_ok[None, :], other=0.0)
        acc = _mm(tl.trans((dcos * inv_nx[:, None]).to(xo.dtype)), xo, acc, INTERP, DOT_PREC)

    # normalisation chain: dw = (H - wh (wh . H)) / max(||w||, eps), wh . H = r
    wo = tl.load(w_ptr + cols.to(tl.int64)[:, None] * stride_wc + ds[None, :],
                 mask=col_ok[:, None] & d_ok[None, :], other=0.0)
    r = tl.where(nw >= eps, r, 0.0)
    dw = (acc - wo.to(tl.float32) * (inv_nw * r)[:, None]) * inv_nw[:, None]
    out = cols.to(tl.int64)[:, None] * D + ds[None, :]
    tl.store(dw_ptr + out, dw.to(dw_ptr.dtype.element_ty), mask=col_ok[:, None] & d_ok[None, :])


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
def _row_norms(a: torch.Tensor) -> torch.Tensor:
    """fp32 L2 norm of each row of ``a`` (R x D, unit column stride), without an fp32 copy of ``a``."""
    R, D = a.shape
    out = torch.empty(R, device=a.device, dtype=torch.float32)
    grid = (triton.cdiv(R, _NORM_BLOCK_R),)
    _row_norm_kernel[grid](a, out, R, D, a.stride(0), BLOCK_R=_NORM_BLOCK_R, BLOCK_D=_NORM_BLOCK_D)
    return out


def _target_terms(x, weight, labels, s, m1, m2, m3, easy_margin):
    """Target logit ``s*phi`` and ``dphi/dcos`` per row (fp32, O(B)), computed in float64 so that
    the branch and clamp decisions are taken on exact values (kernels/margin.py)."""
    x64 = x.double()
    wy64 = weight.index_select(0, labels).double()
    nx = torch.linalg.vector_norm(x64, dim=1).clamp_min(NORM_EPS)
    nw = torch.linalg.vector_norm(wy64, dim=1).clamp_min(NORM_EPS)
    cos_t = (x64 * wy64).sum(dim=1) / (nx * nw)
    phi = target_logit(cos_t, m1, m2, m3, easy_margin)
    slope = target_slope(cos_t, m1, m2, m3, easy_margin)
    return (s * phi).float(), slope.float()


def _forward(x, weight, labels, s, m1, m2, m3, easy_margin, ls):
    B, D = x.shape
    C = weight.shape[0]
    nx, nw = _row_norms(x), _row_norms(weight)
    inv_nx, inv_nw = 1.0 / nx.clamp_min(NORM_EPS), 1.0 / nw.clamp_min(NORM_EPS)
    zt, dphi = _target_terms(x, weight, labels, s, m1, m2, m3, easy_margin)

    n_splits, per_split = split_range(C, triton.cdiv(B, 64), 4 * sm_count(x.device), _SPLIT_GRANULE)
    f32 = dict(device=x.device, dtype=torch.float32)
    part_m, part_l, part_sz, part_best = (torch.empty(n_splits, B, **f32) for _ in range(4))
    part_arg = torch.empty(n_splits, B, device=x.device, dtype=torch.int32)
    grid = lambda meta: (triton.cdiv(B, meta["BLOCK_B"]), n_splits)  # noqa: E731
    _margin_ce_fwd_kernel[grid](
        x, weight, labels, inv_nx, inv_nw, zt,
        part_m, part_l, part_sz, part_best, part_arg,
        B, C, D, per_split, x.stride(0), weight.stride(0), float(s),
        INTERP=INTERPRETING, DOT_PREC=dot_precision(x.dtype),
    )
    # merge the per-split partials (O(B x splits))
    m = part_m.max(dim=0).values
    lse = m + torch.log((part_l * torch.exp(part_m - m)).sum(dim=0))
    zsum = part_sz.sum(dim=0)
    first_best = part_best.argmax(dim=0, keepdim=True)  # first split holding the max: lowest index
    preds = part_arg.gather(0, first_best).squeeze(0).long()
    per_row = lse - (1.0 - ls) * zt - (ls / C) * zsum
    return per_row, preds, (nx, nw, lse, zt, dphi)


def _backward(x, weight, labels, saved, g, s, ls, need_dx, need_dw):
    nx, nw, lse, zt, dphi = saved
    B, D = x.shape
    C = weight.shape[0]
    common = (B, C, D)
    meta = dict(INTERP=INTERPRETING, DOT_PREC=dot_precision(x.dtype))
    scalars = (float(s), float(ls), float(ls) / C, NORM_EPS)
    dx = dw = None
    if need_dx:
        n_splits, per_split = split_range(C, triton.cdiv(B, 32), 4 * sm_count(x.device), _SPLIT_GRANULE,
                                          max_splits=_MAX_DX_SPLITS)
        part = torch.empty(n_splits, B, D, device=x.device, dtype=torch.float32)
        grid = lambda m: (triton.cdiv(B, m["BLOCK_B"]), n_splits, triton.cdiv(D, m["BLOCK_DO"]))  # noqa: E731
        inv_nw = 1.0 / nw.clamp_min(NORM_EPS)
        _margin_ce_bwd_dx_kernel[grid](
            x, weight, labels, nx, inv_nw, lse, zt, dphi, g, part,
            *common, per_split, x.stride(0), weight.stride(0), *scalars, **meta,
        )
        dx = part.sum(dim=0).to(x.dtype)
    if need_dw:
        dw = torch.empty(C, D, device=x.device, dtype=weight.dtype)
        grid = lambda m: (triton.cdiv(C, m["BLOCK_C"]), triton.cdiv(D, m["BLOCK_DO"]))  # noqa: E731
        _margin_ce_bwd_dw_kernel[grid](
            x, weight, labels, nx, nw, lse, zt, dphi, g, dw,
            *common, x.stride(0), weight.stride(0), *scalars, **meta,
        )
    return dx, dw


class _MarginCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, labels, s, m1, m2, m3, easy_margin, ls):
        per_row, preds, saved = _forward(x, weight, labels, s, m1, m2, m3, easy_margin, ls)
        ctx.save_for_backward(x, weight, labels, *saved)
        ctx.hyper = (s, ls)
        ctx.mark_non_differentiable(preds)
        ctx.set_materialize_grads(False)
        return per_row.mean(), per_row, preds

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_mean, g_row, _g_preds):
        x, weight, labels, *saved = ctx.saved_tensors
        if g_mean is None and g_row is None:
            return (None,) * 9
        B = x.shape[0]
        g = torch.zeros(B, device=x.device, dtype=torch.float32)
        if g_mean is not None:
            g += g_mean.float() / B
        if g_row is not None:
            g += g_row.float()
        s, ls = ctx.hyper
        dx, dw = _backward(x, weight, labels, saved, g, s, ls, *ctx.needs_input_grad[:2])
        return dx, dw, None, None, None, None, None, None, None


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


def _check_label_range(labels, weight):
    lo, hi = (int(v) for v in torch.aminmax(labels))  # one host sync
    if lo < 0 or hi >= weight.shape[0]:
        raise ValueError(f"labels must be in [0, {weight.shape[0]}), got values in [{lo}, {hi}]")


def _pack(mean, per_row, preds, return_per_row, return_preds):
    if not (return_per_row or return_preds):
        return mean
    return mean, (per_row if return_per_row else None), (preds if return_preds else None)


def margin_cross_entropy(x, weight, labels, *, s=64.0, m1=1.0, m2=0.5, m3=0.0, easy_margin=False,
                         label_smoothing=0.0, return_per_row=False, return_preds=False):
    """Fused Triton combined-margin cross-entropy; see the module docstring for the exact math and
    kernels/margin.py for the target logit (``easy_margin``: insightface's ``cos > 0`` rule).

    ``x`` B x D and ``weight`` C x D (same float dtype and device, unit stride along D), ``labels``
    int64/int32 of shape B in [0, C). Returns the mean loss (fp32 scalar), or with ``return_per_row``
    / ``return_preds`` the tuple ``(mean, per_row fp32 [B] or None, preds int64 [B] or None)``.
    Differentiable w.r.t. ``x`` and ``weight``; gradients come back in the input dtype.
    """
    _check_shapes(x, weight, labels)
    _check_hyper(s, m1, m2, m3, label_smoothing)
    check_float_dtype(x, "x")
    if weight.dtype != x.dtype:
        raise TypeError(f"x and weight must share a dtype, got {x.dtype} and {weight.dtype}")
    check_same_device({"x": x, "weight": weight, "labels": labels})
    for name, t in (("x", x), ("weight", weight)):
        if t.stride(1) != 1:
            raise ValueError(f"{name} must have contiguous rows (stride(1) == 1), got strides {t.stride()}")
    _check_label_range(labels, weight)
    mean, per_row, preds = _MarginCrossEntropy.apply(
        x, weight, labels.long().contiguous(), float(s), float(m1), float(m2), float(m3), bool(easy_margin),
        float(label_smoothing))
    return _pack(mean, per_row, preds, return_per_row, return_preds)


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
