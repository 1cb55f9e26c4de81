"""kernels/dwconv.py: the Triton depthwise 7x7 convolution (forward, grad input, grad weight, grad
bias) against F.conv2d in float64. CPU runs under the Triton interpreter (tests/conftest.py);
with CUDA and no interpreter the same tests run on the GPU."""

import pytest

from helpers import kernel_devices
import torch

from facefuse.kernels._common import INTERPRETING
from facefuse.kernels import dwconv
from facefuse.kernels.dwconv import depthwise_conv7x7, depthwise_conv7x7_reference, set_backward_mode

DEVICES = kernel_devices(INTERPRETING)
pytestmark = pytest.mark.skipif(not DEVICES, reason="needs CUDA, or TRITON_INTERPRET=1 set before import")
DEVICE = DEVICES[0] if DEVICES else "cpu"
CL = torch.channels_last

# (dtype, tolerance relative to the largest reference entry): fp32 accumulation throughout; the
# half-precision figures are the rounding of the outputs/gradients to their dtype.
FP32 = (torch.float32, 1e-5)
BF16 = (torch.bfloat16, 1e-2)
FP16 = (torch.float16, 2e-3)

# (N, C, H, W, bias, (dtype, tol)): odd/prime channel counts, images smaller than the kernel,
# several pixel and channel blocks; the interpreter is slow, so large shapes stay few.
CASES = [
    (1, 3, 1, 1, True, FP32),
    (2, 17, 3, 7, False, FP32),
    (1, 17, 13, 13, True, FP32),
    (2, 96, 7, 7, True, FP32),
    (2, 5, 13, 13, True, FP32),
    (2, 17, 7, 13, True, BF16),
    (1, 17, 3, 3, False, BF16),
    (2, 17, 7, 13, True, FP16),
    (1, 3, 13, 7, False, FP16),
]


def make_inputs(N, C, H, W, dtype, bias, seed, device=DEVICE, param_dtype=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, H, W, generator=g, dtype=torch.float64)
    w = torch.randn(C, 1, 7, 7, generator=g, dtype=torch.float64) / 7
    b = torch.randn(C, generator=g, dtype=torch.float64) if bias else None
    dy = torch.randn(N, C, H, W, generator=g, dtype=torch.float64)
    pd = param_dtype or dtype
    to = lambda t, dt: None if t is None else t.to(device, dt)  # noqa: E731
    return to(x, dtype).contiguous(memory_format=CL), to(w, pd), to(b, pd), to(dy, dtype)


def check_against_reference(x, w, b, dy, tol):
    xt, wt = x.clone().requires_grad_(), w.clone().requires_grad_()
    bt = b.clone().requires_grad_() if b is not None else None
    y = depthwise_conv7x7(xt, wt, bt)
    assert y.shape == x.shape and y.dtype == x.dtype and y.is_contiguous(memory_format=CL)
    y.backward(dy)

    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    b64 = b.double().requires_grad_() if b is not None else None
    y64 = depthwise_conv7x7_reference(x64, w64, b64)
    y64.backward(dy.double())

    pairs = [("y", y, y64), ("dx", xt.grad, x64.grad), ("dw", wt.grad, w64.grad)]
    if b is not None:
        pairs.append(("db", bt.grad, b64.grad))
    for name, got, ref in pairs:
        scale = ref.abs().max().item()
        assert scale > 0, name
        torch.testing.assert_close(got.double(), ref, atol=tol * scale, rtol=tol, msg=lambda m: f"{name}: {m}")
    assert wt.grad.dtype == w.dtype and (b is None or bt.grad.dtype == b.dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("N,C,H,W,bias,dtype_tol", CASES)
def test_matches_conv2d(device, N, C, H, W, bias, dtype_tol):
    dtype, tol = dtype_tol
    x, w, b, dy = make_inputs(N, C, H, W, dtype, bias, seed=N * 100 + C + H, device=device)
    check_against_reference(x, w, b, dy, tol)


@pytest.mark.parametrize("device", DEVICES)
def test_fp32_parameters_with_bf16_activations(device):
    """The autocast setting: fp32 weight/bias, bf16 x; gradients come back in each input's dtype."""
    x, w, b, dy = make_inputs(2, 17, 3, 7, torch.bfloat16, True, seed=3, device=device, param_dtype=torch.float32)
    check_against_reference(x, w, b, dy, 1e-2)


@pytest.mark.parametrize("device", DEVICES)
def test_only_input_gradient(device):
    x, w, b, dy = make_inputs(1, 5, 7, 7, torch.float32, True, seed=4, device=device)
    xt = x.clone().requires_grad_()
    depthwise_conv7x7(xt, w, b).backward(dy)
    x64 = x.double().requires_grad_()
    depthwise_conv7x7_reference(x64, w.double(), b.double()).backward(dy.double())
    torch.testing.assert_close(xt.grad.double(), x64.grad, atol=1e-5 * x64.grad.abs().max().item(), rtol=1e-5)


@pytest.fixture
def fused_backward():
    previous = set_backward_mode("fused")
    yield
    set_backward_mode(previous)


# the one-pass backward walks pixels one by one (slow under the interpreter): few, varied shapes,
# including an image smaller than the kernel, a channel count that is not a multiple of any block,
# several pixel splits, no bias, and half precision
FUSED_CASES = [*CASES[:2], (2, 40, 9, 5, False, FP32), CASES[5], CASES[8]]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("N,C,H,W,bias,dtype_tol", FUSED_CASES)
def test_fused_backward_matches_conv2d(device, N, C, H, W, bias, dtype_tol, fused_backward):
    dtype, tol = dtype_tol
    x, w, b, dy = make_inputs(N, C, H, W, dtype, bias, seed=N * 100 + C + H, device=device)
    check_against_reference(x, w, b, dy, tol)


@pytest.mark.parametrize("device", DEVICES)
def test_fused_backward_splits_pixels_and_mixes_dtypes(device, monkeypatch, fused_backward):
    """Several pixel splits summed by the host, fp32 parameters with bf16 activations."""
    monkeypatch.setattr(dwconv, "_PIXEL_GRANULE", 16)
    x, w, b, dy = make_inputs(2, 6, 9, 10, torch.bfloat16, True, seed=8, device=device, param_dtype=torch.float32)
    check_against_reference(x, w, b, dy, 1e-2)


def test_backward_mode_is_checked_and_taken_at_forward_time():
    with pytest.raises(ValueError, match="backward mode must be one of split, fused, got 'one-pass'"):
        set_backward_mode("one-pass")
    assert dwconv.backward_mode == "split"  # unchanged by the refused call
    calls = []
    x, w, b, dy = make_inputs(1, 3, 4, 4, torch.float32, True, seed=2)
    real = dwconv._grad_fused
    try:
        dwconv._grad_fused = lambda *a: calls.append(1) or real(*a)
        previous = set_backward_mode("fused")
        y = depthwise_conv7x7(x.clone().requires_grad_(), w.clone().requires_grad_(), b)
        set_backward_mode(previous)  # changed after the forward: the graph keeps the fused backward
        y.backward(dy)
    finally:
        dwconv._grad_fused = real
    assert calls == [1]


def test_wrong_layout_raises():
    x, w, b, _ = make_inputs(2, 5, 4, 6, torch.float32, True, seed=1)
    with pytest.raises(ValueError, match="channels_last"):
        depthwise_conv7x7(x.contiguous(), w, b)


@pytest.mark.parametrize("case", ["weight 3x3", "weight channels", "bias shape", "3-D x", "int x", "devices"])
def test_bad_inputs_raise(case):
    x, w, b, _ = make_inputs(2, 5, 4, 6, torch.float32, True, seed=1)
    args, exc, match = {
        "weight 3x3": ((x, w[:, :, :3, :3], b), ValueError, r"weight must have shape \(5, 1, 7, 7\)"),
        "weight channels": ((x, w[:4], b), ValueError, "weight must have shape"),
        "bias shape": ((x, w, b[:4]), ValueError, "bias must have shape"),
        "3-D x": ((x[0], w, b), ValueError, "4-D"),
        "int x": ((x.to(torch.int32).contiguous(memory_format=CL), w, b), TypeError, "int32"),
        "devices": ((x, w.to("meta"), b), ValueError, "one device"),
    }[case]
    with pytest.raises(exc, match=match):
        depthwise_conv7x7(*args)


def test_cpu_tensors_rejected_when_not_interpreting(monkeypatch):
    import facefuse.kernels._common as common

    monkeypatch.setattr(common, "INTERPRETING", False)
    x, w, b, _ = make_inputs(1, 3, 3, 3, torch.float32, True, seed=1, device="cpu")
    with pytest.raises(ValueError, match="CUDA tensors"):
        depthwise_conv7x7(x, w, b)
