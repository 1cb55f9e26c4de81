r"""Depthwise 7x7 convolution (stride 1, padding 3) on channels-last tensors, and its reference.

Math, for x of logical shape N x C x H x W stored NHWC, weight C x 1 x 7 x 7, bias C::

    y[n, c, h, w]   = b[c] + sum_{kh, kw in 0..6} w[c, kh, kw] * x[n, c, h + kh - 3, w + kw - 3]
    dx[n, c, h, w]  = sum_{kh, kw} w[c, 6 - kh, 6 - kw] * dy[n, c, h + kh - 3, w + kw - 3]
                      (the same convolution with the kernel flipped in both axes)
    dw[c, kh, kw]   = sum_{n, h, w} dy[n, c, h, w] * x[n, c, h + kh - 3, w + kw - 3]
    db[c]           = sum_{n, h, w} dy[n, c, h, w]
    (x outside the image is zero.)

Design. A program owns a block of channels (contiguous in NHWC, so every load is coalesced) and a
block of output pixels; it loops over the 49 taps (7 rows at run time, 7 columns unrolled) with
masked loads (the halo comes from L1/L2) and accumulates in fp32. Grad input reuses the forward
kernel with the flipped taps. Grad weight and bias: programs over (pixel split, channel block); for
each filter row kh, seven register tiles (one per column) accumulate dy * shifted x elementwise over
every pixel block of the split, so the cross-thread reduction over pixels runs once per tap per
program (49 in all) instead of once per tap per pixel block, and no 49-row tile is updated by
masked selects; dy is re-read once per filter row (7 times, from L1/L2: a split is a few hundred
pixels). The fp32 partials (splits x 49 x C, splits x C) are summed by the host: deterministic, no
atomics.

One-pass backward (``set_backward_mode("fused")``): with s_t the tap's shift, dx[q] = sum_t w[t] *
dy[q - s_t] and dw[t] = sum_q dy[q - s_t] * x[q], so one load of the 49 shifted dy vectors around a
pixel serves both gradients: dy is read from DRAM once (the split backward reads it twice) and x is
never loaded shifted (the split weight gradient loads it 49 times per pixel from L1/L2). A program
walks its pixels one by one with a 64 x BLOCK_C tap tile; the weight-gradient accumulators gather
over pixels in registers, and dx[q] is a sum over the tap axis, which the compiler spreads over a
few lanes (shuffles per pixel). Which backward is faster is for a GPU run (``bench_dwconv.py``
times both); the split one stays the default until then.
Weight and bias may be fp32 while x is bf16/fp16 (the usual autocast setting): they are read as
fp32; the output has x's dtype, each gradient its input's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from facefuse.kernels._common import (
    INTERPRETING,
    check_float_dtype,
    check_same_device,
    check_tensor,
    pick_configs,
    sm_count,
    split_range,
)

K = 7  # kernel size
PAD = 3  # padding
_PIXEL_GRANULE = 256 if INTERPRETING else 512  # pixels per grad-weight split: a multiple of this (>= 2 blocks)

# No tl.dot and almost no shared memory: every config fits the L40 (sm_89) and Hopper (H100/H200)
# alike; an offline compile (bf16) showed <= 200 registers per thread and no spills for all of them.
_FWD_CONFIGS = pick_configs(
    [
        triton.Config({"BLOCK_P": 32, "BLOCK_C": 32}, num_warps=4),
        triton.Config({"BLOCK_P": 64, "BLOCK_C": 32}, num_warps=4),
        triton.Config({"BLOCK_P": 32, "BLOCK_C": 64}, num_warps=4),
        triton.Config({"BLOCK_P": 64, "BLOCK_C": 64}, num_warps=8),
        triton.Config({"BLOCK_P": 128, "BLOCK_C": 64}, num_warps=8),
        triton.Config({"BLOCK_P": 16, "BLOCK_C": 128}, num_warps=4),  # wide-channel late stages
    ],
    triton.Config({"BLOCK_P": 128, "BLOCK_C": 64}, num_warps=1),
)
# Weight gradient: seven BLOCK_P x BLOCK_C fp32 accumulators live in registers, so the tiles are
# kept to 8-16 elements per thread; 128 x 64 on 8 warps (32 each) spilled 320 bytes on both targets.
_BWD_W_CONFIGS = pick_configs(
    [
        triton.Config({"BLOCK_P": 32, "BLOCK_C": 32}, num_warps=4),
        triton.Config({"BLOCK_P": 32, "BLOCK_C": 64}, num_warps=8),
        triton.Config({"BLOCK_P": 64, "BLOCK_C": 32}, num_warps=8),
        triton.Config({"BLOCK_P": 16, "BLOCK_C": 64}, num_warps=4),
        triton.Config({"BLOCK_P": 64, "BLOCK_C": 64}, num_warps=8),
    ],
    triton.Config({"BLOCK_P": 128, "BLOCK_C": 64}, num_warps=1),
)


# One-pass backward: a program walks its pixels one at a time with a 64-row tap tile (49 used) by
# BLOCK_C channels; the 49 weight-gradient accumulators and the 49 taps stay in registers (236-247
# per thread offline, no spills); 64 channels on one warp spilled ~480 bytes on both targets.
_BWD_FUSED_CONFIGS = pick_configs(
    [
        triton.Config({"BLOCK_C": 32}, num_warps=1),
        triton.Config({"BLOCK_C": 64}, num_warps=2),
        triton.Config({"BLOCK_C": 128}, num_warps=4),
    ],
    triton.Config({"BLOCK_C": 32}, num_warps=1),
)
BACKWARD_MODES = ("split", "fused")
backward_mode = "split"  # the backward of calls made from now on (set_backward_mode); split until a GPU run picks


def set_backward_mode(mode: str) -> str:
    """Choose the backward: ``"split"`` (dx by the forward kernel with flipped taps, then dw/db) or
    ``"fused"`` (dx, dw and db in one pass over dy). Returns the previous mode."""
    global backward_mode
    if mode not in BACKWARD_MODES:
        raise ValueError(f"backward mode must be one of {', '.join(BACKWARD_MODES)}, got {mode!r}")
    previous, backward_mode = backward_mode, mode
    return previous


@triton.autotune(configs=_FWD_CONFIGS, key=["C", "H", "W"])
@triton.jit
def _dwconv7x7_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,  # pointers: x, y NHWC; w 49 x C taps (tap-major); b C (unused if not HAS_BIAS)
    NHW, H, W, C,  # shapes
    HAS_BIAS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,  # meta
):
    # y[p, c] for a block of pixels p (flattened n, h, w) and a block of channels c
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    p_ok = p < NHW
    c_ok = c < C
    h = (p // W) % H
    w = p % W
    x_base = x_ptr + p.to(tl.int64)[:, None] * C + c[None, :]
    w_base = w_ptr + c
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for kh in range(7):  # a runtime loop: unrolling all 49 taps would keep 49 loads in flight and spill
        row_ok = p_ok & (h >= 3 - kh) & (h < H + 3 - kh)  # input row h + kh - 3 inside the image
        x_row = x_base + ((kh - 3) * W - 3) * C  # same image, shifted by (kh - 3, -3)
        w_row = w_base + kh * 7 * C
        for kw in tl.static_range(7):
            ok = row_ok & (w >= 3 - kw) & (w < W + 3 - kw)  # input column w + kw - 3 inside the image
            xv = tl.load(x_row + kw * C, mask=ok[:, None] & c_ok[None, :], other=0.0)
            wv = tl.load(w_row + kw * C, mask=c_ok, other=0.0)
            acc += xv.to(tl.float32) * wv.to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    dst = p.to(tl.int64)[:, None] * C + c[None, :]
    tl.store(y_ptr + dst, acc.to(y_ptr.dtype.element_ty), mask=p_ok[:, None] & c_ok[None, :])


@triton.autotune(configs=_BWD_W_CONFIGS, key=["C", "H", "W"])
@triton.jit
def _dwconv7x7_bwd_w_kernel(
    x_ptr, dy_ptr, dw_ptr, db_ptr,  # pointers: x, dy NHWC; partials dw splits x 49 x C, db splits x C (fp32)
    NHW, H, W, C, P_PER_SPLIT,  # shapes
    HAS_BIAS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,  # meta
):
    # dw[tap, c] = sum over this split's pixels p of dy[p, c] * x[p shifted by the tap, c], and
    # db[c] = sum of dy[p, c]. Per filter row kh, seven accumulator tiles (one per column kw) gather
    # dy * shifted x elementwise over all of the split's pixel blocks, in each thread's registers;
    # the cross-thread reduction over pixels happens once per tap per program, at the end of the row.
    pid_s = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    p_begin = pid_s * P_PER_SPLIT
    p_end = tl.minimum(p_begin + P_PER_SPLIT, NHW)
    out = dw_ptr + pid_s * 49 * C + c
    acc_b = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for kh in range(7):  # runtime loop; dy is re-read per row (from L1/L2: the split is small)
        a0 = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
        a1 = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
        a2 = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
        a3 = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
        a4 = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
        a5 = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
        a6 = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
        for p0 in range(p_begin, p_end, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            p_ok = p < p_end
            h = (p // W) % H
            w = p % W
            offs = p.to(tl.int64)[:, None] * C + c[None, :]
            dy = tl.load(dy_ptr + offs, mask=p_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
            if HAS_BIAS:
                if kh == 0:  # db from the first row's pass over dy only
                    acc_b += dy
            row_ok = p_ok & (h >= 3 - kh) & (h < H + 3 - kh)  # input row h + kh - 3 inside the image
            x_row = x_ptr + offs + ((kh - 3) * W - 3) * C  # same image, shifted by (kh - 3, -3)
            a0 += dy * _shifted(x_row, 0, row_ok, w, W, C, c_ok)
            a1 += dy * _shifted(x_row, 1, row_ok, w, W, C, c_ok)
            a2 += dy * _shifted(x_row, 2, row_ok, w, W, C, c_ok)
            a3 += dy * _shifted(x_row, 3, row_ok, w, W, C, c_ok)
            a4 += dy * _shifted(x_row, 4, row_ok, w, W, C, c_ok)
            a5 += dy * _shifted(x_row, 5, row_ok, w, W, C, c_ok)
            a6 += dy * _shifted(x_row, 6, row_ok, w, W, C, c_ok)
        row = out + kh * 7 * C
        tl.store(row, tl.sum(a0, axis=0), mask=c_ok)
        tl.store(row + C, tl.sum(a1, axis=0), mask=c_ok)
        tl.store(row + 2 * C, tl.sum(a2, axis=0), mask=c_ok)
        tl.store(row + 3 * C, tl.sum(a3, axis=0), mask=c_ok)
        tl.store(row + 4 * C, tl.sum(a4, axis=0), mask=c_ok)
        tl.store(row + 5 * C, tl.sum(a5, axis=0), mask=c_ok)
        tl.store(row + 6 * C, tl.sum(a6, axis=0), mask=c_ok)
    if HAS_BIAS:
        tl.store(db_ptr + pid_s * C + c, tl.sum(acc_b, axis=0), mask=c_ok)


@triton.autotune(configs=_BWD_FUSED_CONFIGS, key=["C", "H", "W"])
@triton.jit
def _dwconv7x7_bwd_fused_kernel(
    x_ptr, dy_ptr, w_ptr, dx_ptr, dw_ptr, db_ptr,  # x, dy, dx NHWC; w 49 x C taps; partials dw splits x 49 x C, db splits x C
    NHW, H, W, C, P_PER_SPLIT,  # shapes
    HAS_BIAS: tl.constexpr, BLOCK_C: tl.constexpr,  # meta
):
    # With s_t = (kh - 3, kw - 3) and q any pixel:
    #   dx[q] = sum_t w[t] * dy[q - s_t]          dw[t] = sum_q dy[q - s_t] * x[q]
    # so the 49 shifted dy vectors around q serve both: each is read once (from L1/L2; dy itself
    # from DRAM once) for one FMA into dx[q] and one into the tap's accumulator. The accumulators
    # gather over the program's pixels in registers (no cross-thread reduction in the loop); the
    # host sums the splits' fp32 partials, as for the split backward.
    pid_s = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    t = tl.arange(0, 64)
    t_ok = t < 49
    kh = t // 7
    kw = t % 7
    shift = (3 - kh) * W + (3 - kw)  # dy[q - s_t] as a flat pixel offset from q
    tile_ok = t_ok[:, None] & c_ok[None, :]
    taps = tl.load(w_ptr + t[:, None] * C + c[None, :], mask=tile_ok, other=0.0).to(tl.float32)
    acc = tl.zeros((64, BLOCK_C), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_C,), dtype=tl.float32)
    p_begin = pid_s * P_PER_SPLIT
    p_end = tl.minimum(p_begin + P_PER_SPLIT, NHW)
    for q in range(p_begin, p_end):
        h = (q // W) % H
        w = q % W
        hh = h + 3 - kh
        ww = w + 3 - kw
        ok = t_ok & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
        src = (q + shift).to(tl.int64)[:, None] * C + c[None, :]
        dyt = tl.load(dy_ptr + src, mask=ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
        here = (q + tl.zeros((BLOCK_C,), dtype=tl.int64)) * C + c  # int64 before the multiply
        xq = tl.load(x_ptr + here, mask=c_ok, other=0.0).to(tl.float32)
        tl.store(dx_ptr + here, tl.sum(taps * dyt, axis=0).to(dx_ptr.dtype.element_ty), mask=c_ok)
        acc += dyt * xq[None, :]
        if HAS_BIAS:
            acc_b += tl.load(dy_ptr + here, mask=c_ok, other=0.0).to(tl.float32)
    tl.store(dw_ptr + pid_s * 49 * C + t[:, None] * C + c[None, :], acc, mask=tile_ok)
    if HAS_BIAS:
        tl.store(db_ptr + pid_s * C + c, acc_b, mask=c_ok)


@triton.jit
def _shifted(x_row, kw: tl.constexpr, row_ok, w, W, C, c_ok):
    # x at column offset kw - 3 of a row already shifted by (kh - 3, -3), zero outside the image (fp32)
    ok = row_ok & (w >= 3 - kw) & (w < W + 3 - kw)
    return tl.load(x_row + kw * C, mask=ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)


def _conv(x: torch.Tensor, taps: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Launch the 7x7 depthwise kernel: ``taps`` is 49 x C (tap-major), output channels_last."""
    N, C, H, W = x.shape
    y = torch.empty_like(x, memory_format=torch.channels_last)
    grid = lambda m: (triton.cdiv(N * H * W, m["BLOCK_P"]), triton.cdiv(C, m["BLOCK_C"]))  # noqa: E731
    _dwconv7x7_kernel[grid](x, taps, bias if bias is not None else taps, y, N * H * W, H, W, C,
                            HAS_BIAS=bias is not None)
    return y


def _taps(weight: torch.Tensor, flip: bool = False) -> torch.Tensor:
    """C x 1 x 7 x 7 -> 49 x C contiguous (tap index kh*7 + kw), optionally flipped in kh and kw."""
    w = weight.reshape(weight.shape[0], K * K)
    if flip:
        w = w.flip(1)  # index kh*7+kw -> 48 - (kh*7+kw) = (6-kh)*7 + (6-kw)
    return w.t().contiguous()


def _partials(x, has_bias):
    """The pixel split of a weight-gradient launch and its fp32 partials (splits x 49 x C, splits x C)."""
    N, C, H, W = x.shape
    n_splits, per_split = split_range(N * H * W, triton.cdiv(C, 64), 4 * sm_count(x.device), _PIXEL_GRANULE)
    dw = torch.empty(n_splits, K * K, C, device=x.device, dtype=torch.float32)
    db = torch.empty(n_splits, C, device=x.device, dtype=torch.float32) if has_bias else dw
    grid = lambda m: (n_splits, triton.cdiv(C, m["BLOCK_C"]))  # noqa: E731
    return grid, per_split, dw, db


def _summed(dw, db, has_bias):
    """The host's sum of the splits' partials: dw C x 1 x 7 x 7, db C or None (fp32)."""
    C = dw.shape[2]
    return dw.sum(dim=0).t().reshape(C, 1, K, K), (db.sum(dim=0) if has_bias else None)


def _grad_weight_bias(x, dy, has_bias):
    N, C, H, W = x.shape
    grid, per_split, dw, db = _partials(x, has_bias)
    _dwconv7x7_bwd_w_kernel[grid](x, dy, dw, db, N * H * W, H, W, C, per_split, HAS_BIAS=has_bias)
    return _summed(dw, db, has_bias)


def _grad_fused(x, dy, weight, has_bias):
    """dx, dw (fp32), db (fp32 or None) in one pass over dy (``_dwconv7x7_bwd_fused_kernel``)."""
    N, C, H, W = x.shape
    grid, per_split, dw, db = _partials(x, has_bias)
    dx = torch.empty_like(x, memory_format=torch.channels_last)
    _dwconv7x7_bwd_fused_kernel[grid](x, dy, _taps(weight), dx, dw, db, N * H * W, H, W, C, per_split,
                                      HAS_BIAS=has_bias)
    return (dx, *_summed(dw, db, has_bias))


class _DepthwiseConv7x7(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.backward_mode = backward_mode  # the mode when the forward ran
        return _conv(x, _taps(weight), bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dy = dy.contiguous(memory_format=torch.channels_last)
        dx = dw32 = db32 = None
        need_wb = ctx.needs_input_grad[1] or (ctx.has_bias and ctx.needs_input_grad[2])
        if ctx.backward_mode == "fused" and ctx.needs_input_grad[0] and need_wb:
            dx, dw32, db32 = _grad_fused(x, dy, weight, ctx.has_bias)
        else:
            if ctx.needs_input_grad[0]:
                dx = _conv(dy, _taps(weight, flip=True), None)
            if need_wb:
                dw32, db32 = _grad_weight_bias(x, dy, ctx.has_bias)
        dw = dw32.to(weight.dtype) if dw32 is not None and ctx.needs_input_grad[1] else None
        db = db32.to(ctx.bias_dtype) if db32 is not None and ctx.needs_input_grad[2] else None
        return dx, dw, db


def _check_inputs(x, weight, bias):
    check_tensor(x, "x")
    check_tensor(weight, "weight")
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D N x C x H x W, got shape {tuple(x.shape)}")
    C = x.shape[1]
    if tuple(weight.shape) != (C, 1, K, K):
        raise ValueError(f"weight must have shape ({C}, 1, 7, 7) for {C} channels, got {tuple(weight.shape)}")
    tensors = {"x": x, "weight": weight}
    if bias is not None:
        check_tensor(bias, "bias")
        if tuple(bias.shape) != (C,):
            raise ValueError(f"bias must have shape ({C},), got {tuple(bias.shape)}")
        tensors["bias"] = bias
    for name, t in tensors.items():
        check_float_dtype(t, name)
    if not x.is_contiguous(memory_format=torch.channels_last):
        raise ValueError(
            f"x must be in torch.channels_last memory format (NHWC), got strides {x.stride()}; "
            "call x.contiguous(memory_format=torch.channels_last)"
        )
    if x.numel() == 0:
        raise ValueError(f"empty input of shape {tuple(x.shape)}")
    check_same_device(tensors)


def depthwise_conv7x7(x, weight, bias=None):
    """Triton depthwise 7x7 convolution, stride 1, padding 3 (see the module docstring).

    ``x`` N x C x H x W in channels_last memory format, fp32/bf16/fp16; ``weight`` C x 1 x 7 x 7,
    ``bias`` C or None (fp32/bf16/fp16, may differ from x's dtype). Returns N x C x H x W in
    channels_last with x's dtype; differentiable w.r.t. x, weight and bias.
    """
    _check_inputs(x, weight, bias)
    return _DepthwiseConv7x7.apply(x, weight, bias)


def depthwise_conv7x7_reference(x, weight, bias=None):
    """``F.conv2d(x, weight, bias, padding=3, groups=C)``: the CPU/ONNX path and test oracle."""
    return F.conv2d(x, weight, bias, padding=PAD, groups=x.shape[1])
