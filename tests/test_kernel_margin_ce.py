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
# (dtype, loss atol, gradient tolerance relative to the largest reference gradient entry).
# The forward accumulates exact products in fp32 for every dtype; the backward feeds dcos to the
# tensor cores in the input dtype and returns gradients in it, hence the looser half-precision figures.
DTYPES = [
    (torch.float32, 2e-4, 1e-4),
    (torch.bfloat16, 2e-4, 3e-2),
    (torch.float16, 2e-4, 4e-3),
]


def make_inputs(B, D, C, dtype, seed, device=DEVICE):
    """Weights ~ N(0, 1); x_i = a_i * w_{y_i}/||w_{y_i}|| + noise with a_i spread so that the
    target cosines cover most of (-1, 1) (both margin branches), never zeros."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(C, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (B,), generator=g)
    a = (torch.rand(B, 1, generator=g, dtype=torch.float64) * 4 - 2) * math.sqrt(D)
    x = a * F.normalize(w[y], dim=1) + torch.randn(B, D, generator=g, dtype=torch.float64)
    return x.to(device, dtype), w.to(device, dtype), y.to(device)


def run_both(x, w, y, **kw):
    """Fused loss on (x, w), reference on float64 copies; returns both (mean, per_row, preds), the
    grads of mean + 0.3 * sum(per_row * r) (r random, so the per-row path is exercised) and cos."""
    kw = dict(kw, return_per_row=True, return_preds=True)
    r = torch.rand(x.shape[0], generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(x.device)
    xf, wf = x.clone().requires_grad_(), w.clone().requires_grad_()
    got = margin_cross_entropy(xf, wf, y, **kw)
    (got[0] + 0.3 * (got[1] * r.float()).sum()).backward()
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    ref = margin_cross_entropy_reference(x64, w64, y, **kw)
    (ref[0] + 0.3 * (ref[1] * r).sum()).backward()
    cos = F.normalize(x.double(), dim=1) @ F.normalize(w.double(), dim=1).T
    return got, (xf.grad, wf.grad), ref, (x64.grad, w64.grad), cos


def assert_matches(got, got_grads, ref, ref_grads, cos, loss_atol, grad_tol, dtype):
    mean, per_row, preds = got
    assert mean.dtype == torch.float32 and mean.dim() == 0
    assert per_row.dtype == torch.float32 and preds.dtype == torch.int64
    torch.testing.assert_close(per_row.double(), ref[1], atol=loss_atol, rtol=1e-5)
    torch.testing.assert_close(mean.double(), ref[0], atol=loss_atol, rtol=1e-5)
    # preds: argmax of cos (exact ties are measure-zero; fp32 rounding may swap near-ties only)
    picked = cos.gather(1, preds[:, None]).squeeze(1)
    assert bool((picked >= cos.max(dim=1).values - 1e-5).all()), (preds, ref[2])
    for g, r in zip(got_grads, ref_grads):
        assert g.dtype == dtype
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
    assert_matches(*out, 2e-4, 1e-4, torch.float32)


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
    assert_matches(*out, 2e-4, 1e-4, torch.float32)
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
    assert_matches(*out, 2e-4, 1e-5, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_batch_with_a_single_label(device):
    x, w, y = make_inputs(12, 16, 7, torch.float32, seed=11, device=device)
    y = torch.full_like(y, 3)
    out = run_both(x, w, y, s=30.0, m1=1.0, m2=0.3, m3=0.1, label_smoothing=0.2)
    assert_matches(*out, 2e-4, 1e-4, torch.float32)


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
    torch.testing.assert_close(xf.grad.double(), x64.grad, atol=1e-4 * x64.grad.abs().max().item(), rtol=1e-4)


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
