"""kernels/margin_ce.py: the fused Triton loss against its float64 reference, and the reference
against PyTorch's cross-entropy, autograd's gradcheck and a plain per-row loop.

On CPU the kernels run under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1);
with CUDA (and no interpreter) the same tests run on the GPU.
"""

import math

import pytest

from helpers import kernel_devices
import torch
import torch.nn.functional as F

import facefuse.kernels.margin_ce as mce
from facefuse.kernels._common import INTERPRETING
from facefuse.kernels.margin_ce import margin_cross_entropy, margin_cross_entropy_reference

DEVICES = kernel_devices(INTERPRETING)
pytestmark = pytest.mark.skipif(not DEVICES, reason="needs CUDA, or TRITON_INTERPRET=1 set before import")
DEVICE = DEVICES[0] if DEVICES else "cpu"

MARGINS = {  # (m1, m2, m3)
    "normface": (1.0, 0.0, 0.0),
    "arcface": (1.0, 0.5, 0.0),
    "cosface": (1.0, 0.0, 0.35),
    "sphereface135": (1.35, 0.0, 0.0),
    "sphereface4": (4.0, 0.0, 0.0),
    "combined": (1.2, 0.3, 0.2),
}
# (dtype, loss atol, gradient tolerance relative to the largest reference gradient entry): 2-10x
# the error `benchmarks/kernel_error.py` measures under the interpreter (Triton 3.8, CPU; figures in
# kernels/README.md and benchmarks/results/kernel_error-cpu2.json); these tests also weight a
# random per-row loss term into the gradient.
# The forward accumulates exact products in fp32; the backward rounds dcos to the input dtype for
# the tensor cores, hence the half-precision gradient figures; with fp32 W the loss also sees W
# rounded to x's dtype (amplified by s = 64). On a GPU fp32 dots are 3xTF32 (not measured yet).
DTYPES = [
    (torch.float32, 2.5e-5, 4e-6),
    (torch.bfloat16, 2.5e-5, 3.6e-2),
    (torch.float16, 2e-5, 2e-3),
]
MIXED = [  # (x dtype, loss atol, gradient tolerance), W in fp32
    (torch.bfloat16, 0.14, 5e-2),
    (torch.float16, 2e-2, 3e-3),
]
FP32_LOSS, FP32_GRAD = DTYPES[0][1:]


def make_inputs(B, D, C, dtype, seed, device=DEVICE):
    """Weights ~ N(0, 1); x_i = a_i * w_{y_i}/||w_{y_i}|| + noise with a_i spread so that the
    target cosines cover most of (-1, 1) (both margin branches), never zeros."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(C, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (B,), generator=g)
    a = (torch.rand(B, 1, generator=g, dtype=torch.float64) * 4 - 2) * math.sqrt(D)
    x = a * F.normalize(w[y], dim=1) + torch.randn(B, D, generator=g, dtype=torch.float64)
    return x.to(device, dtype), w.to(device, dtype), y.to(device)


def run_both(x, w, y, fused_kw=None, **kw):
    """Fused loss on (x, w) (plus ``fused_kw``, e.g. grad_filter), reference on float64 copies;
    returns both (mean, per_row, preds), the grads of mean + 0.3 * sum(per_row * r) (r random, so the
    per-row path is exercised) and cos."""
    kw = dict(kw, return_per_row=True, return_preds=True)
    r = torch.rand(x.shape[0], generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(x.device)
    xf, wf = x.clone().requires_grad_(), w.clone().requires_grad_()
    got = margin_cross_entropy(xf, wf, y, **kw, **(fused_kw or {}))
    (got[0] + 0.3 * (got[1] * r.float()).sum()).backward()
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    ref = margin_cross_entropy_reference(x64, w64, y, **kw)
    (ref[0] + 0.3 * (ref[1] * r).sum()).backward()
    cos = F.normalize(x.double(), dim=1) @ F.normalize(w.to(x.dtype).double(), dim=1).T
    return got, (xf.grad, wf.grad), ref, (x64.grad, w64.grad), cos


def assert_matches(got, got_grads, ref, ref_grads, cos, loss_atol, grad_tol, dtype, w_dtype=None):
    mean, per_row, preds = got
    assert mean.dtype == torch.float32 and mean.dim() == 0
    assert per_row.dtype == torch.float32 and preds.dtype == torch.int64
    torch.testing.assert_close(per_row.double(), ref[1], atol=loss_atol, rtol=1e-5)
    torch.testing.assert_close(mean.double(), ref[0], atol=loss_atol, rtol=1e-5)
    # preds: argmax of cos (exact ties are measure-zero; fp32 rounding may swap near-ties only)
    picked = cos.gather(1, preds[:, None]).squeeze(1)
    assert bool((picked >= cos.max(dim=1).values - 1e-5).all()), (preds, ref[2])
    for g, r, dt in zip(got_grads, ref_grads, (dtype, w_dtype or dtype)):
        assert g.dtype == dt
        scale = r.abs().max().item()
        assert scale > 0
        torch.testing.assert_close(g.double(), r, atol=grad_tol * scale, rtol=grad_tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("margin", list(MARGINS))
def test_fused_matches_reference_every_margin(device, margin):
    m1, m2, m3 = MARGINS[margin]
    ls = 0.1 if margin in ("arcface", "sphereface4", "combined") else 0.0
    x, w, y = make_inputs(7, 17, 37, torch.float32, seed=list(MARGINS).index(margin), device=device)
    out = run_both(x, w, y, s=64.0, m1=m1, m2=m2, m3=m3, label_smoothing=ls)
    assert_matches(*out, FP32_LOSS, FP32_GRAD, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("margin", ["arcface", "cosface", "sphereface4", "combined"])
def test_fused_easy_margin_matches_reference(device, margin):
    """insightface's easy_margin rule (margin only where cos > 0) through the fused kernel: the
    target terms change on the host, the kernels do not; rows with cos <= 0 lose their margin."""
    m1, m2, m3 = MARGINS[margin]
    x, w, y = make_inputs(11, 17, 37, torch.float32, seed=40 + list(MARGINS).index(margin), device=device)
    cos_t = (F.normalize(x.double(), dim=1) * F.normalize(w.double(), dim=1)[y]).sum(1).cpu()
    assert (cos_t <= 0).any() and (cos_t > 0).any()
    kw = dict(s=64.0, m1=m1, m2=m2, m3=m3, label_smoothing=0.1)
    out = run_both(x, w, y, easy_margin=True, **kw)
    assert_matches(*out, FP32_LOSS, FP32_GRAD, torch.float32)
    hard = margin_cross_entropy_reference(x.double(), w.double(), y, **kw, return_per_row=True)[1].cpu()
    easy = out[2][1].detach().cpu()
    assert torch.equal(easy[cos_t > 0], hard[cos_t > 0])
    assert (easy[cos_t <= 0] < hard[cos_t <= 0]).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,loss_atol,grad_tol", DTYPES)
@pytest.mark.parametrize("B,D,C", [(1, 3, 5), (7, 17, 37), (33, 64, 130)])
def test_fused_matches_reference_shapes_dtypes(device, B, D, C, dtype, loss_atol, grad_tol):
    x, w, y = make_inputs(B, D, C, dtype, seed=B * 1000 + C, device=device)
    out = run_both(x, w, y, s=64.0, m1=1.0, m2=0.5, m3=0.0, label_smoothing=0.1)
    assert_matches(*out, loss_atol, grad_tol, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,loss_atol,grad_tol", DTYPES[:2])
def test_theta_plus_margin_beyond_pi(device, dtype, loss_atol, grad_tol):
    """Rows with theta + m2 > pi take the fallback branch: x = -w_y exactly (cos outside the clamp
    range, zero target gradient) and x = -w_y + noise (fallback slope 1)."""
    B, D, C, m2 = 9, 16, 11, 0.5
    x, w, y = make_inputs(B, D, C, torch.float64, seed=7, device="cpu")
    noise = torch.randn(B, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x[:3] = -w[y[:3]]
    x[3:7] = -w[y[3:7]] + 0.15 * noise[3:7] * w[y[3:7]].norm(dim=1, keepdim=True) / math.sqrt(D)
    x, w = x.to(dtype), w.to(dtype)
    cos_t = (F.normalize(x.double(), dim=1) * F.normalize(w.double(), dim=1)[y]).sum(1)
    theta = torch.acos(cos_t.clamp(-1 + 1e-7, 1 - 1e-7))
    inside = (cos_t > -1 + 1e-7) & (theta > math.pi - m2)
    assert (cos_t[:3] < -1 + 1e-7).all() and inside[3:7].all()  # both cases really built
    out = run_both(x.to(device), w.to(device), y.to(device), s=64.0, m1=1.0, m2=m2, m3=0.0, label_smoothing=0.0)
    assert_matches(*out, loss_atol, grad_tol, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_target_gradient_vanishes_outside_clamp_range(device):
    """cos_iy = -1 + 5e-8 (outside the clamp range, but not exactly antiparallel, so the target
    term is not projected away): the target logit must pass no gradient, as autograd through clamp."""
    B, D, C = 5, 16, 9
    x, w, y = make_inputs(B, D, C, torch.float64, seed=13, device="cpu")
    wh = F.normalize(w[y], dim=1)
    u = torch.randn(B, D, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    u = F.normalize(u - (u * wh).sum(1, keepdim=True) * wh, dim=1)
    alpha = math.acos(1 - 5e-8)
    x = 3.0 * (-math.cos(alpha) * wh + math.sin(alpha) * u)
    x, w = x.float(), w.float()
    cos_t = (F.normalize(x.double(), dim=1) * F.normalize(w.double(), dim=1)[y]).sum(1)
    assert (cos_t < -1 + 1e-7).all() and (cos_t > -1 + 1e-8).all()
    out = run_both(x.to(device), w.to(device), y.to(device), s=64.0, m1=1.0, m2=0.5, m3=0.0, label_smoothing=0.0)
    assert_matches(*out, FP32_LOSS, FP32_GRAD, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_batch_with_a_single_label(device):
    x, w, y = make_inputs(12, 16, 7, torch.float32, seed=11, device=device)
    y = torch.full_like(y, 3)
    out = run_both(x, w, y, s=30.0, m1=1.0, m2=0.3, m3=0.1, label_smoothing=0.2)
    assert_matches(*out, FP32_LOSS, FP32_GRAD, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_gradient_through_per_row_only_and_frozen_weight(device):
    """Backward with the mean unused (its grad is None) and a weight that needs no gradient."""
    x, w, y = make_inputs(10, 24, 19, torch.float32, seed=5, device=device)
    xf = x.clone().requires_grad_()
    _, per_row, _ = margin_cross_entropy(xf, w, y.int(), s=32.0, m2=0.4, return_per_row=True)
    (per_row ** 2).sum().backward()
    x64 = x.double().requires_grad_()
    _, ref_row, _ = margin_cross_entropy_reference(x64, w.double(), y, s=32.0, m2=0.4, return_per_row=True)
    (ref_row ** 2).sum().backward()
    torch.testing.assert_close(xf.grad.double(), x64.grad, atol=FP32_GRAD * x64.grad.abs().max().item(),
                               rtol=FP32_GRAD)


@pytest.mark.parametrize("device", DEVICES)
def test_return_forms(device):
    x, w, y = make_inputs(5, 8, 6, torch.float32, seed=2, device=device)
    mean = margin_cross_entropy(x, w, y)
    assert isinstance(mean, torch.Tensor) and mean.dim() == 0 and mean.dtype == torch.float32
    m2, per_row, preds = margin_cross_entropy(x, w, y, return_per_row=True)
    assert preds is None and per_row.shape == (5,)
    torch.testing.assert_close(m2, mean)
    _, per_row, preds = margin_cross_entropy(x, w, y, return_preds=True)
    assert per_row is None and preds.shape == (5,) and preds.dtype == torch.int64


# ------------------------------------------------------------------------------------------------
# Shapes that are multiples of no block size, several class splits and D chunks, fp32 master weights
# ------------------------------------------------------------------------------------------------
ODD_SHAPES = [(37, 45, 101), (19, 70, 197), (40, 33, 300)]  # (B, D, C)


def test_odd_shapes_exercise_several_splits_and_chunks():
    """The shapes below really cross block boundaries in every direction of both kernels (under the
    interpreter's config; on a GPU the blocks are larger and the shapes still not multiples)."""
    fwd, bwd = mce._FWD_CONFIGS[0].kwargs, mce._BWD_CONFIGS[0].kwargs
    blocks = [fwd["BLOCK_B"], fwd["BLOCK_C"], fwd["BLOCK_K"], bwd["BLOCK_B"], bwd["BLOCK_C"], bwd["BLOCK_D"]]
    for B, D, C in ODD_SHAPES:
        assert all(n % b for n in (B, D, C) for b in blocks if b <= n)
        assert B > bwd["BLOCK_B"] and C > bwd["BLOCK_C"] and D > bwd["BLOCK_D"] and D > fwd["BLOCK_K"]
    splits = [mce.split_range(C, -(-B // 64), 4 * mce.sm_count(torch.device(DEVICE)), mce._SPLIT_GRANULE)[0]
              for B, D, C in ODD_SHAPES]
    assert max(splits) >= 3


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,loss_atol,grad_tol", DTYPES)
@pytest.mark.parametrize("B,D,C", ODD_SHAPES)
def test_fused_matches_reference_odd_shapes(device, B, D, C, dtype, loss_atol, grad_tol):
    x, w, y = make_inputs(B, D, C, dtype, seed=B + C, device=device)
    out = run_both(x, w, y, s=64.0, m1=1.0, m2=0.5, m3=0.0, label_smoothing=0.1)
    assert_matches(*out, loss_atol, grad_tol, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,loss_atol,grad_tol", MIXED)
@pytest.mark.parametrize("B,D,C", ODD_SHAPES[:2])
def test_fp32_master_weight_with_half_inputs(device, B, D, C, dtype, loss_atol, grad_tol):
    """Autocast's setting: bf16/fp16 x, fp32 W read as it is (tiles cast on load); dx comes back
    in x's dtype, dW in fp32. Reference: float64 on the unrounded fp32 W."""
    x, _, y = make_inputs(B, D, C, dtype, seed=B + C, device=device)
    w = make_inputs(B, D, C, torch.float32, seed=B + C, device=device)[1]
    out = run_both(x, w, y, s=64.0, m1=1.0, m2=0.5, m3=0.0, label_smoothing=0.1)
    assert_matches(*out, loss_atol, grad_tol, dtype, w_dtype=torch.float32)


# ------------------------------------------------------------------------------------------------
# The work counts
# ------------------------------------------------------------------------------------------------
def test_work_counts_meet_the_target():
    B, D, C = 512, 512, 100_000
    work = mce.margin_ce_work(B, C, D, x_dtype=torch.bfloat16)
    assert work["fwd"]["gemm_eq"] == 1 and work["bwd"]["gemm_eq"] == 3
    assert work["total"]["gemm_eq"] == 4 <= 4  # target: <= 4 GEMM-equivalents without filtering
    assert work["fwd"]["w_reads"] == 1 and work["total"]["w_reads"] == 3  # target: W read <= 3 times
    assert work["total"]["flops"] == 4 * 2 * B * C * D
    assert work["total"]["bytes"] == work["fwd"]["bytes"] + work["bwd"]["bytes"]
    assert work["fwd"]["bytes"] >= C * D * 2  # W once, bf16
    # label smoothing alone changes nothing; with the filter it costs a pass over W, and a filter
    # that keeps 10% of the tiles leaves 1 + 0.2 backward GEMM-equivalents
    assert mce.margin_ce_work(B, C, D, label_smoothing=0.1)["total"]["w_reads"] == 3
    filt = mce.margin_ce_work(B, C, D, label_smoothing=0.1, grad_filter=True, kept_fraction=0.1)
    assert filt["bwd"]["gemm_eq"] == pytest.approx(1.2) and filt["total"]["w_reads"] == 4
    assert mce.margin_ce_work(B, C, D, need_dw=False)["bwd"]["gemm_eq"] == 2
    # fp32 master weights: W bytes at 4 per element and no cast of dW
    mixed = mce.margin_ce_work(B, C, D, x_dtype=torch.bfloat16, w_dtype=torch.float32)
    assert mixed["fwd"]["bytes"] > work["fwd"]["bytes"] + C * D


# ------------------------------------------------------------------------------------------------
# Gradient filtering
# ------------------------------------------------------------------------------------------------
def _masked_gradient(x, w, y, s, m2, ls, keep):
    """float64 dx, dW with dL/dz kept only where ``keep`` (B x C bool), except label smoothing's
    uniform term, which stays on every entry: what the filtered kernel should compute."""
    B, C = x.shape[0], w.shape[0]
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    cos = F.normalize(x64, dim=1) @ F.normalize(w64, dim=1).T
    from facefuse.kernels.margin import target_logit

    is_t = torch.arange(C)[None, :] == y[:, None]
    z = s * torch.where(is_t, target_logit(cos.gather(1, y[:, None]), 1.0, m2, 0.0), cos)
    with torch.no_grad():
        p = torch.softmax(z, dim=1)
        dz = (p - (1 - ls) * is_t.double()) * keep.double() - ls / C
    (z * dz / B).sum().backward()
    return x64.grad, w64.grad, p


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ls", [0.0, 0.1])
def test_grad_filter_skips_exactly_the_negligible_tiles(device, ls):
    """With a threshold set in a wide gap between tile maxima, the filtered gradient equals the
    float64 gradient with the skipped tiles' softmax terms removed (label smoothing's uniform term
    kept, added analytically), and differs from the exact one; the loss is unchanged."""
    B, D, C, s, m2 = 37, 45, 101, 64.0, 0.5
    bb, bc = mce._BWD_CONFIGS[0].kwargs["BLOCK_B"], mce._BWD_CONFIGS[0].kwargs["BLOCK_C"]
    x, w, y = make_inputs(B, D, C, torch.float32, seed=3, device="cpu")
    _, _, p = _masked_gradient(x, w, y, s, m2, ls, torch.ones(B, C, dtype=torch.bool))
    # largest non-target p of each tile; tiles holding a target are always kept
    is_t = torch.arange(C)[None, :] == y[:, None]
    pad_b, pad_c = -B % bb, -C % bc
    tile_p = F.pad(torch.where(is_t, 0.0, p), (0, pad_c, 0, pad_b)).view(-(-B // bb), bb, -(-C // bc), bc)
    tile_t = F.pad(is_t, (0, pad_c, 0, pad_b)).view(-(-B // bb), bb, -(-C // bc), bc).any(3).any(1)
    tile_max = tile_p.amax(dim=(1, 3))
    cand = tile_max[~tile_t].log().sort().values
    gap = (cand[1:] - cand[:-1]).argmax()
    assert cand[gap + 1] - cand[gap] > math.log(4)  # a factor >= 4 either side: no fp32 near-ties
    thresh = float(((cand[gap] + cand[gap + 1]) / 2).exp())
    keep_tile = tile_t | (tile_max >= thresh)
    assert 0 < int((~keep_tile).sum()) < keep_tile.numel()  # some tiles skipped, some kept
    keep = keep_tile.repeat_interleave(bb, 0).repeat_interleave(bc, 1)[:B, :C]
    want_dx, want_dw, _ = _masked_gradient(x, w, y, s, m2, ls, keep)
    exact_dx, exact_dw, _ = _masked_gradient(x, w, y, s, m2, ls, torch.ones(B, C, dtype=torch.bool))

    xf, wf = x.to(device).requires_grad_(), w.to(device).requires_grad_()
    loss = margin_cross_entropy(xf, wf, y.to(device), s=s, m2=m2, label_smoothing=ls, grad_filter=thresh)
    loss.backward()
    ref = margin_cross_entropy_reference(x.double(), w.double(), y, s=s, m2=m2, label_smoothing=ls)
    torch.testing.assert_close(loss.double().cpu(), ref, atol=FP32_LOSS, rtol=1e-5)
    for got, want, exact in ((xf.grad, want_dx, exact_dx), (wf.grad, want_dw, exact_dw)):
        scale = want.abs().max().item()
        torch.testing.assert_close(got.double().cpu(), want, atol=FP32_GRAD * scale, rtol=FP32_GRAD)
        assert (want - exact).abs().max() > 100 * FP32_GRAD * scale  # the filter really changed it


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 0.17), (torch.float16, 1.1e-2)])
def test_grad_filter_default_threshold_on_a_peaked_softmax(device, dtype, tol):
    """Default threshold (bf16 2^-12, fp16 2^-15) on batches whose softmax is concentrated on the
    targets (the trained regime CCE filters in), with label smoothing (analytic uniform term): the
    filtered gradient is no further from the float64 one than the unfiltered kernel's. There the
    rounding error dominates: measured max |error| / max |gradient| over seeds 8-11 (interpreter),
    unfiltered / filtered: bf16 8.4e-2 / 8.3e-2, fp16 5.5e-3 / 4.8e-3; tol = 2x."""
    assert mce.filter_threshold(torch.bfloat16) == 2.0 ** -12
    assert mce.filter_threshold(torch.float16) == 2.0 ** -15
    B, D, C = 37, 45, 101
    g = torch.Generator().manual_seed(8)
    w = torch.randn(C, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (B,), generator=g)
    x = 4.0 * F.normalize(w[y], dim=1) + 0.05 * torch.randn(B, D, generator=g, dtype=torch.float64)
    x, w, y = x.to(device, dtype), w.to(device, dtype), y.to(device)
    errors = {}
    for filt in (False, True):
        got, grads, ref, ref_grads, _ = run_both(x, w, y, s=64.0, m1=1.0, m2=0.5, m3=0.0, label_smoothing=0.1,
                                                 fused_kw=dict(grad_filter=filt))
        torch.testing.assert_close(got[1].double(), ref[1], atol=dict((d, a) for d, a, _ in DTYPES)[dtype], rtol=1e-5)
        errors[filt] = max(((a.double() - b).abs().max() / b.abs().max()).item() for a, b in zip(grads, ref_grads))
    assert errors[False] < tol and errors[True] < tol
    assert errors[True] <= 1.25 * errors[False], errors


# ------------------------------------------------------------------------------------------------
# No host sync, no B x C tensor, bad labels without a sync
# ------------------------------------------------------------------------------------------------
class _Recorder:
    """TorchDispatchMode recording every op and the shapes of the tensors it returns."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        rec = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                outs = out if isinstance(out, (tuple, list)) else [out]
                rec.ops.append((str(func), [tuple(t.shape) for t in outs if isinstance(t, torch.Tensor)]))
                return out

        self.ops, self.mode = [], Mode()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grad_filter,ls", [(False, 0.0), (True, 0.1)])
def test_fused_path_allocates_no_BxC_tensor_and_never_syncs(device, grad_filter, ls):
    """Every torch op of the fused forward and backward (the launchers' allocations and O(B) merges;
    Triton kernels are not torch ops) seen through a dispatch mode: none returns a tensor with B x C
    elements, and none is ``_local_scalar_dense`` (what .item() / int() / bool() on a tensor run, the
    host sync). check_labels=False is the device path (the CPU default checks labels with a sync)."""
    B, D, C = 6, 16, 37  # B*C = 222 is no multiple of C*D, B*D or the partial buffers' sizes
    x, w, y = make_inputs(B, D, C, torch.float32, seed=12, device=device)
    xf, wf = x.clone().requires_grad_(), w.clone().requires_grad_()
    rec = _Recorder()
    with rec.mode:
        loss = margin_cross_entropy(xf, wf, y, label_smoothing=ls, grad_filter=grad_filter, check_labels=False)
        loss.backward()
    assert len(rec.ops) > 5 and xf.grad is not None and wf.grad is not None
    names = [name for name, _ in rec.ops]
    assert not any("_local_scalar_dense" in n for n in names), names
    big = [(n, sh) for n, shapes in rec.ops for sh in shapes if math.prod(sh) % (B * C) == 0 and math.prod(sh)]
    assert not big, big
    # and the reference does make one (so the check can see it)
    rec = _Recorder()
    with rec.mode:
        margin_cross_entropy_reference(x, w, y)
    assert any(math.prod(sh) == B * C for _, shapes in rec.ops for sh in shapes)


@pytest.mark.parametrize("device", DEVICES)
def test_out_of_range_label_without_check_gives_nan_loss(device):
    x, w, y = make_inputs(5, 8, 6, torch.float32, seed=2, device=device)
    for bad in (6, -1):
        labels = y.clone()
        labels[2] = bad
        mean, per_row, _ = margin_cross_entropy(x, w, labels, check_labels=False, return_per_row=True)
        assert torch.isnan(mean) and torch.isnan(per_row).all()
    assert torch.isfinite(margin_cross_entropy(x, w, y, check_labels=False))
    with pytest.raises(ValueError, match="labels must be in"):
        margin_cross_entropy(x, w, torch.where(y == y[0], 6, y), check_labels=True)


# ------------------------------------------------------------------------------------------------
# The margin math against textbook formulas (independent of kernels/margin.py)
# ------------------------------------------------------------------------------------------------
def _textbook_phi(name, c):
    c = min(max(c, -1 + 1e-7), 1 - 1e-7)
    if name == "arcface":  # Deng et al. 2019, cos(theta + m) = c cos m - sin(theta) sin m, theta <= pi - m
        m = 0.5
        return c * math.cos(m) - math.sqrt(1 - c * c) * math.sin(m) if c >= math.cos(math.pi - m) \
            else c + math.cos(m) - 1
    if name == "cosface":  # Wang et al. 2018
        return c - 0.35
    # SphereFace (normalised), m = 2: cos(2 theta) = 2c^2 - 1 for theta <= pi/2, then c - cos(pi/2) - 1
    return 2 * c * c - 1 if c >= 0 else c - 1


TEXTBOOK = {"arcface": (1.0, 0.5, 0.0), "cosface": (1.0, 0.0, 0.35), "sphereface2": (2.0, 0.0, 0.0)}


def _textbook_mean_loss(x, w, y, name, s, ls):
    """Mean loss with plain Python floats and the math module."""
    B, C = len(x), len(w)
    total = 0.0
    for i in range(B):
        nx = math.sqrt(sum(v * v for v in x[i]))
        cos = [sum(a * b for a, b in zip(x[i], w[j])) / (nx * math.sqrt(sum(v * v for v in w[j]))) for j in range(C)]
        z = [s * c for c in cos]
        z[y[i]] = s * _textbook_phi(name, cos[y[i]])
        mx = max(z)
        lse = mx + math.log(sum(math.exp(v - mx) for v in z))
        total += lse - (1 - ls) * z[y[i]] - ls / C * sum(z)
    return total / B


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(TEXTBOOK))
def test_fused_against_textbook_loss_and_finite_differences(device, name):
    """The kernel's loss against the textbook per-row formula, and its gradients against central
    finite differences of that formula (float64, h = 1e-6), away from branch points and the clamp."""
    B, D, C, s, ls = 4, 5, 7, 8.0, 0.1
    x, w, y = make_inputs(B, D, C, torch.float64, seed=31, device="cpu")
    xl, wl, yl = x.tolist(), w.tolist(), y.tolist()
    m1, m2, m3 = TEXTBOOK[name]
    xf, wf = x.float().to(device).requires_grad_(), w.float().to(device).requires_grad_()
    loss = margin_cross_entropy(xf, wf, y.to(device), s=s, m1=m1, m2=m2, m3=m3, label_smoothing=ls)
    loss.backward()
    assert abs(loss.item() - _textbook_mean_loss(xl, wl, yl, name, s, ls)) < 1e-5
    h = 1e-6
    for got, base in ((xf.grad, xl), (wf.grad, wl)):
        fd = torch.zeros(len(base), D, dtype=torch.float64)
        for r in range(len(base)):
            for k in range(D):
                orig = base[r][k]
                base[r][k] = orig + h
                up = _textbook_mean_loss(xl, wl, yl, name, s, ls)
                base[r][k] = orig - h
                down = _textbook_mean_loss(xl, wl, yl, name, s, ls)
                base[r][k] = orig
                fd[r, k] = (up - down) / (2 * h)
        scale = fd.abs().max().item()
        torch.testing.assert_close(got.double().cpu(), fd, atol=1e-5 * scale, rtol=1e-4)


# ------------------------------------------------------------------------------------------------
# CUDA only
# ------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETING, reason="needs a GPU (compiled kernels)")
@pytest.mark.parametrize("grad_filter", [False, True])
def test_fwd_bwd_captures_in_a_cuda_graph(grad_filter):
    """No host sync anywhere: forward + backward capture in a CUDA graph and replay to the eager values."""
    x, w, y = make_inputs(64, 128, 3000, torch.bfloat16, seed=5, device="cuda")
    xf, wf = x.clone().requires_grad_(), w.clone().requires_grad_()

    def step():
        xf.grad = wf.grad = None
        loss = margin_cross_entropy(xf, wf, y, label_smoothing=0.1, grad_filter=grad_filter)
        loss.backward()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # autotune and warm up outside the capture
            eager = step().detach().clone()
    torch.cuda.current_stream().wait_stream(side)
    eager_dx, eager_dw = xf.grad.clone(), wf.grad.clone()
    graph = torch.cuda.CUDAGraph()
    xf.grad = wf.grad = None
    with torch.cuda.graph(graph):
        loss = margin_cross_entropy(xf, wf, y, label_smoothing=0.1, grad_filter=grad_filter)
        loss.backward()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(loss, eager, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(xf.grad.float(), eager_dx.float(), atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(wf.grad.float(), eager_dw.float(), atol=1e-2, rtol=1e-2)


def _bad_inputs():
    x, w, y = make_inputs(4, 6, 5, torch.float32, seed=1, device=DEVICE)
    return [
        ("label>=C", (x, w, torch.tensor([0, 1, 5, 2], device=DEVICE)), ValueError, r"labels must be in \[0, 5\)"),
        ("label<0", (x, w, torch.tensor([0, -1, 3, 2], device=DEVICE)), ValueError, "labels must be in"),
        ("D mismatch", (x, w[:, :5].contiguous(), y), ValueError, "feature sizes differ"),
        ("dtype mismatch", (x, w.double(), y), TypeError, "share x.s dtype or be float32"),
        ("half x, fp32 w ok; fp32 x, half w not", (x, w.half(), y), TypeError, "share x.s dtype"),
        ("float64", (x.double(), w.double(), y), TypeError, "float64"),
        ("1-D x", (x[0], w, y), ValueError, "2-D"),
        ("strided rows", (x.t().contiguous().t(), w, y), ValueError, "contiguous rows"),
        ("float labels", (x, w, y.float()), TypeError, "int64 or int32"),
        ("label shape", (x, w, y[:3]), ValueError, "labels must have shape"),
        ("devices", (x, w, y.to("meta")), ValueError, "one device"),
        ("not a tensor", (x.tolist(), w, y), TypeError, "torch.Tensor"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_inputs())))
def test_bad_input_raises_before_launch(monkeypatch, case):
    def launched(*args, **kwargs):
        raise AssertionError("a kernel was launched for bad input")

    monkeypatch.setattr(mce, "_forward", launched)
    name, args, exc, match = _bad_inputs()[case]
    with pytest.raises(exc, match=match):
        margin_cross_entropy(*args)


def test_bad_hyper_parameters_raise():
    x, w, y = make_inputs(3, 4, 5, torch.float32, seed=1, device=DEVICE)
    for kw, match in [({"s": 0.0}, "s must be"), ({"m1": 0.0}, "m1 must be"),
                      ({"label_smoothing": 1.0}, "label_smoothing")]:
        with pytest.raises(ValueError, match=match):
            margin_cross_entropy(x, w, y, **kw)
        with pytest.raises(ValueError, match=match):
            margin_cross_entropy_reference(x, w, y, **kw)


def test_cpu_tensors_rejected_when_not_interpreting(monkeypatch):
    import facefuse.kernels._common as common

    monkeypatch.setattr(common, "INTERPRETING", False)
    x, w, y = make_inputs(3, 4, 5, torch.float32, seed=1, device="cpu")
    with pytest.raises(ValueError, match="CUDA tensors"):
        margin_cross_entropy(x, w, y)


# ------------------------------------------------------------------------------------------------
# The reference itself (CPU, float64)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("margin", ["arcface", "sphereface4", "combined", "cosface"])
def test_reference_gradcheck(margin):
    m1, m2, m3 = MARGINS[margin]
    x, w, y = make_inputs(4, 5, 6, torch.float64, seed=21, device="cpu")
    cos_t = (F.normalize(x, dim=1) * F.normalize(w, dim=1)[y]).sum(1)
    theta = torch.acos(cos_t)
    assert ((theta - (math.pi - m2) / m1).abs() > 0.05).all()  # away from the branch point
    assert (cos_t.abs() < 1 - 1e-3).all()  # and from the clamp edges
    x.requires_grad_()
    w.requires_grad_()
    fn = lambda a, b: margin_cross_entropy_reference(  # noqa: E731
        a, b, y, s=8.0, m1=m1, m2=m2, m3=m3, label_smoothing=0.1, return_per_row=True)[1]
    assert torch.autograd.gradcheck(fn, (x, w), eps=1e-6, atol=1e-6)


def test_reference_without_margin_is_cross_entropy_of_scaled_cosines():
    x, w, y = make_inputs(9, 12, 13, torch.float64, seed=4, device="cpu")
    cos = F.normalize(x, dim=1) @ F.normalize(w, dim=1).T
    mean, per_row, preds = margin_cross_entropy_reference(x, w, y, s=16.0, m1=1.0, m2=0.0, m3=0.0,
                                                          return_per_row=True, return_preds=True)
    torch.testing.assert_close(per_row, F.cross_entropy(16.0 * cos, y, reduction="none"), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(mean, F.cross_entropy(16.0 * cos, y), atol=1e-12, rtol=1e-12)
    assert torch.equal(preds, cos.argmax(1))


def test_reference_label_smoothing_is_pytorchs():
    x, w, y = make_inputs(9, 12, 13, torch.float64, seed=6, device="cpu")
    cos = F.normalize(x, dim=1) @ F.normalize(w, dim=1).T
    got = margin_cross_entropy_reference(x, w, y, s=10.0, m1=1.0, m2=0.0, m3=0.0, label_smoothing=0.25)
    torch.testing.assert_close(got, F.cross_entropy(10.0 * cos, y, label_smoothing=0.25), atol=1e-12, rtol=1e-12)


def test_reference_matches_a_plain_loop():
    """Per-row loss written out with math.* on Python floats, both branches of phi."""
    s, m1, m2, m3, ls = 20.0, 1.1, 0.6, 0.1, 0.15
    x, w, y = make_inputs(8, 6, 5, torch.float64, seed=9, device="cpu")
    got = margin_cross_entropy_reference(x, w, y, s=s, m1=m1, m2=m2, m3=m3, label_smoothing=ls,
                                         return_per_row=True)[1]
    th_star = (math.pi - m2) / m1
    branches = set()
    for i in range(8):
        xi = x[i].tolist()
        nx = math.sqrt(sum(v * v for v in xi))
        cos = []
        for j in range(5):
            wj = w[j].tolist()
            cos.append(sum(a * b for a, b in zip(xi, wj)) / (nx * math.sqrt(sum(v * v for v in wj))))
        c = min(max(cos[int(y[i])], -1 + 1e-7), 1 - 1e-7)
        t = math.acos(c)
        branches.add(t <= th_star)
        phi = math.cos(m1 * t + m2) - m3 if t <= th_star else c - math.cos(th_star) - 1 - m3
        z = [s * v for v in cos]
        z[int(y[i])] = s * phi
        mx = max(z)
        lse = mx + math.log(sum(math.exp(v - mx) for v in z))
        want = lse - (1 - ls) * z[int(y[i])] - ls / 5 * sum(z)
        assert abs(got[i].item() - want) < 1e-10
    assert branches == {True, False}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ls", [0.0, 0.1])
def test_shard_partials_combine_to_the_full_loss_and_gradients(device, ls):
    """The model-parallel API (trainer/sharded_head.py's fused path) in one process: W cut into
    three uneven shards, each shard's partials from margin_ce_shard_forward, combined as the
    all-reduces would, and each shard's backward from the global lse, must give the reference
    loss, dx (sum of the shards' shares) and dW (the shards' blocks)."""
    from facefuse.kernels.margin_ce import margin_ce_shard_backward, margin_ce_shard_forward

    g = torch.Generator().manual_seed(5)
    B, D, C = 9, 40, 53
    x = torch.randn(B, D, generator=g).to(device)
    w = torch.randn(C, D, generator=g).to(device)
    y = torch.randint(0, C, (B,), generator=g).to(device)
    hyper = dict(s=16.0, m1=1.0, m2=0.4, m3=0.05, easy_margin=False)
    xr, wr = x.clone().double().requires_grad_(True), w.clone().double().requires_grad_(True)
    ref = margin_cross_entropy_reference(xr, wr, y, label_smoothing=ls, **hyper)
    ref.backward()
    cuts = [0, 11, 30, C]
    parts = []
    for lo, hi in zip(cuts, cuts[1:]):
        target = torch.where((y >= lo) & (y < hi), y - lo, -1)
        parts.append(margin_ce_shard_forward(x, w[lo:hi].contiguous(), target, **hyper))
    m = torch.stack([p.m for p in parts]).max(0).values
    lse = m + torch.log(sum(p.l * torch.exp(p.m - m) for p in parts))
    loss = (lse - (1 - ls) * sum(p.zt for p in parts) - ls / C * sum(p.zsum for p in parts)).mean()
    torch.testing.assert_close(loss.double().cpu(), ref.detach().cpu(), rtol=1e-5, atol=1e-5)
    grads = [margin_ce_shard_backward(x, w[lo:hi].contiguous(), p, lse, torch.full((B,), 1.0 / B, device=device),
                                      s=hyper["s"], label_smoothing=ls, num_classes=C)
             for p, (lo, hi) in zip(parts, zip(cuts, cuts[1:]))]
    torch.testing.assert_close(sum(dx for dx, _ in grads).double().cpu(), xr.grad.cpu(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.cat([dw for _, dw in grads]).double().cpu(), wr.grad.cpu(), rtol=1e-4, atol=1e-5)
    # the best cosine of the shards combined is the reference prediction
    best = torch.stack([p.best for p in parts])
    cls = torch.stack([p.column + lo for p, lo in zip(parts, cuts)])
    pred = cls.gather(0, best.argmax(0, keepdim=True)).squeeze(0)
    want = (F.normalize(x.double(), dim=1) @ F.normalize(w.double(), dim=1).T).argmax(1)
    assert torch.equal(pred.cpu(), want.cpu())
