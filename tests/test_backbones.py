"""The from-scratch backbones: shapes, parameter counts from hand formulas, ConvNeXt block math
against an F.conv2d reference, stochastic depth, init, gradient flow and option errors."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import facefuse.trainer.ops
from facefuse.trainer.backbones import BACKBONES, build_backbone
from facefuse.trainer.backbones.convnext import ConvNeXt, ConvNeXtBlock
from facefuse.trainer.backbones.layers import DropPath, LayerNorm2d, make_divisible
from facefuse.trainer.backbones.resnet import BasicBlock, Bottleneck

NAMES = sorted(BACKBONES)
CONVNEXTS = [n for n in NAMES if n.startswith("convnext")]
CONVNEXT_CONFIGS = {
    "convnext_t": ((3, 3, 9, 3), (96, 192, 384, 768)),
    "convnext_nano": ((2, 2, 8, 2), (80, 160, 320, 640)),
    "convnext_pico": ((2, 2, 6, 2), (64, 128, 256, 512)),
    "convnext_atto": ((2, 2, 6, 2), (40, 80, 160, 320)),
}
RESNET_CONFIGS = {"resnet18": ("basic", (2, 2, 2, 2)), "resnet34": ("basic", (3, 4, 6, 3)),
                  "resnet50": ("bottleneck", (3, 4, 6, 3))}  # fmt: skip


@functools.lru_cache(maxsize=None)
def eval_model(name: str) -> nn.Module:
    """One shared eval-mode instance per name, for tests that do not change the model."""
    torch.manual_seed(0)
    return build_backbone(name).eval()


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- shapes and attributes


@pytest.mark.parametrize("size", [112, 64])
@pytest.mark.parametrize("name", NAMES)
def test_output_shape(name, size):
    model = eval_model(name)
    batch = 1 if name == "convnext_t" and size == 112 else 2
    x = torch.randn(batch, 3, size, size)
    with torch.no_grad():
        y = model(x)
        assert torch.equal(y, model.forward_features(x))
    expected_reduction = 32 if name.startswith("convnext") else 16
    assert model.reduction == expected_reduction
    assert y.shape == (batch, model.num_features, size // model.reduction, size // model.reduction)
    assert torch.isfinite(y).all() and y.abs().sum() > 0
    assert isinstance(model.stem, nn.Module) and isinstance(model.stages, nn.Sequential)


def test_112px_maps():
    """The face-adapted strides of the brief: 7x7 out of ResNet/MobileNetV2, 3x3 out of ConvNeXt, and
    the ResNet/ConvNeXt stages at 56/28/14/7 and 28/14/7/3 px."""
    x = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        for name, sides in [("resnet18", [56, 28, 14, 7]), ("convnext_atto", [28, 14, 7, 3])]:
            model = eval_model(name)
            h, seen = model.stem(x), []
            for stage in model.stages:
                h = stage(h)
                seen.append(h.shape[-1])
            assert seen == sides
        assert eval_model("mobilenetv2")(x).shape[-2:] == (7, 7)


@pytest.mark.parametrize("name, width, features", [
    ("resnet18", 0.5, 256), ("resnet50", 0.25, 512), ("convnext_atto", 0.5, 160),
    ("mobilenetv2", 0.5, 1280), ("mobilenetv2", 1.4, 1792),
])  # fmt: skip
def test_width(name, width, features):
    model = build_backbone(name, width=width).eval()
    assert model.num_features == features
    with torch.no_grad():
        y = model(torch.randn(2, 3, 64, 64))
    assert y.shape == (2, features, 64 // model.reduction, 64 // model.reduction)


def test_mobilenet_channels_and_last_channels():
    model = build_backbone("mobilenetv2", width=0.35)
    assert all(m.out_channels % 8 == 0 for m in model.modules() if isinstance(m, nn.Conv2d))
    model = build_backbone("mobilenetv2", last_channels=512).eval()
    assert model.num_features == 512
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 512, 4, 4)
    with pytest.raises(ValueError, match="last_channels"):
        build_backbone("mobilenetv2", last_channels=0)


def test_make_divisible():
    assert [make_divisible(v) for v in (32, 11.2, 16 * 0.35, 1280 * 1.4, 44)] == [32, 16, 8, 1792, 48]
    assert make_divisible(91.0) == 88 and make_divisible(76.0) == 80  # nearest, and >= 90% of value


# ---------------------------------------------------------------- parameter counts


def conv_params(c_in, c_out, k, groups=1, bias=False):
    return c_in // groups * c_out * k * k + (c_out if bias else 0)


def resnet_formula(kind: str, depths, widths=(64, 128, 256, 512)) -> int:
    """Hand count: stem conv3x3 + BN, then blocks (2 params per BN channel), 1x1 conv + BN shortcuts."""
    total = conv_params(3, widths[0], 3) + 2 * widths[0]
    c_in, expansion = widths[0], (1 if kind == "basic" else 4)
    for i, (depth, planes) in enumerate(zip(depths, widths)):
        for j in range(depth):
            c_out = planes * expansion
            if kind == "basic":
                total += conv_params(c_in, planes, 3) + conv_params(planes, planes, 3) + 4 * planes
            else:
                total += conv_params(c_in, planes, 1) + conv_params(planes, planes, 3)
                total += conv_params(planes, c_out, 1) + 4 * planes + 2 * c_out
            if (i > 0 and j == 0) or c_in != c_out:
                total += conv_params(c_in, c_out, 1) + 2 * c_out
            c_in = c_out
    return total


def convnext_formula(depths, dims) -> int:
    """Hand count: stem 4x4 conv + LN; per stage LN + 2x2 conv; per block dw7x7 + LN + 2 linears + gamma."""
    total = conv_params(3, dims[0], 4, bias=True) + 2 * dims[0]
    for i, (depth, c) in enumerate(zip(depths, dims)):
        if i > 0:
            total += 2 * dims[i - 1] + conv_params(dims[i - 1], c, 2, bias=True)
        block = conv_params(c, c, 7, groups=c, bias=True) + 2 * c + (c * 4 * c + 4 * c) + (4 * c * c + c) + c
        total += depth * block
    return total + 2 * dims[-1]  # the final LayerNorm


@pytest.mark.parametrize("name", sorted(RESNET_CONFIGS))
def test_resnet_param_count(name):
    kind, depths = RESNET_CONFIGS[name]
    assert n_params(eval_model(name)) == resnet_formula(kind, depths)


def test_resnet18_matches_torchvision_trunk_less_stem():
    """torchvision's resnet18 has 11,689,512 params: minus its fc (512*1000 + 1000) and minus the
    difference between its 7x7 stem conv and our 3x3 one, it must equal ours."""
    expected = 11_689_512 - (512 * 1000 + 1000) - (7 * 7 - 3 * 3) * 3 * 64
    assert n_params(eval_model("resnet18")) == expected


@pytest.mark.parametrize("name", CONVNEXTS)
def test_convnext_param_count(name):
    assert n_params(eval_model(name)) == convnext_formula(*CONVNEXT_CONFIGS[name])


def test_published_trunk_sizes():
    # ConvNeXt-T: 28.6M with the ImageNet head (768 x 1000 linear + its LayerNorm) -> ~27.8M trunk
    convnext_t = n_params(eval_model("convnext_t"))
    assert convnext_t < 35e6 and 27.6e6 < convnext_t < 28.0e6
    # MobileNetV2 1.0: 3.50M with the 1280 x 1000 classifier -> ~2.22M trunk
    assert 2.15e6 < n_params(eval_model("mobilenetv2")) < 2.30e6


# ---------------------------------------------------------------- ConvNeXt block


def block_reference(block: ConvNeXtBlock, x: torch.Tensor) -> torch.Tensor:
    """The block written out with F.conv2d in float64 (no drop path)."""
    p = {k: v.detach().double() for k, v in block.state_dict().items()}
    x = x.double()
    c = x.shape[1]
    y = F.conv2d(x, p["dwconv.weight"], p["dwconv.bias"], padding=3, groups=c)
    y = y.permute(0, 2, 3, 1)
    mean, var = y.mean(-1, keepdim=True), y.var(-1, unbiased=False, keepdim=True)
    y = (y - mean) / torch.sqrt(var + block.norm.eps) * p["norm.weight"] + p["norm.bias"]
    y = y @ p["pwconv1.weight"].T + p["pwconv1.bias"]
    y = 0.5 * y * (1 + torch.erf(y / math.sqrt(2)))
    y = y @ p["pwconv2.weight"].T + p["pwconv2.bias"]
    return x + (p["gamma"] * y).permute(0, 3, 1, 2)


def randomised_block(dim: int, drop_path: float = 0.0, backend: str = "torch") -> ConvNeXtBlock:
    block = ConvNeXtBlock(dim, drop_path, backend)
    with torch.no_grad():  # give every parameter a non-trivial value so each one matters
        for p in block.parameters():
            p.copy_(torch.randn_like(p) * 0.3 + 0.1)
    return block


@pytest.mark.parametrize("shape", [(2, 8, 7, 7), (1, 13, 11, 5), (3, 5, 1, 17)])
@pytest.mark.parametrize("dtype, atol, rtol", [(torch.float32, 1e-4, 1e-4), (torch.float64, 1e-10, 1e-10)])
def test_convnext_block_matches_reference(shape, dtype, atol, rtol):
    torch.manual_seed(1)
    block = randomised_block(shape[1]).to(dtype).eval()
    x = torch.randn(shape, dtype=dtype)
    torch.testing.assert_close(block(x).double(), block_reference(block, x), atol=atol, rtol=rtol)


def test_convnext_dwconv_goes_through_ops(monkeypatch):
    calls = []
    original = facefuse.trainer.ops.depthwise_conv7x7

    def spy(x, weight, bias, backend="torch"):
        calls.append((backend, x.is_contiguous(memory_format=torch.channels_last), tuple(x.shape)))
        return original(x, weight, bias, backend="torch")  # the reference, whatever was asked

    monkeypatch.setattr(facefuse.trainer.ops, "depthwise_conv7x7", spy)
    model = build_backbone("convnext_atto").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        y_torch = model(x)
    depths = CONVNEXT_CONFIGS["convnext_atto"][0]
    assert len(calls) == sum(depths) and {c[0] for c in calls} == {"torch"}
    # one call per block, at the stage's resolution and width
    assert [c[2][1:] for c in calls[:3]] == [(40, 16, 16), (40, 16, 16), (80, 8, 8)]

    calls.clear()
    model.set_kernel_backend("triton")
    blocks = [m for m in model.modules() if isinstance(m, ConvNeXtBlock)]
    assert all(b.kernel_backend == "triton" for b in blocks)
    with torch.no_grad():
        y_triton = model(x)
    assert len(calls) == sum(depths) and all(b == "triton" and cl for b, cl, _ in calls)
    torch.testing.assert_close(y_triton, y_torch, atol=1e-5, rtol=1e-5)  # layout change only
    with pytest.raises(ValueError, match="backend"):
        model.set_kernel_backend("cuda")
    with pytest.raises(ValueError, match="backend"):
        build_backbone("convnext_atto", kernel_backend="bogus")


def test_uniform_set_kernel_backend():
    for name in ("resnet18", "mobilenetv2"):
        model = build_backbone(name, width=0.25, kernel_backend="triton")
        model.set_kernel_backend("torch")
        assert model.kernel_backend == "torch"
        with pytest.raises(ValueError, match="backend"):
            model.set_kernel_backend("nope")


def test_layer_scale_and_init():
    torch.manual_seed(2)
    model = build_backbone("convnext_pico")
    blocks = [m for m in model.modules() if isinstance(m, ConvNeXtBlock)]
    assert all(torch.equal(b.gamma, torch.full_like(b.gamma, 1e-6)) for b in blocks)
    # at init the blocks are nearly the identity: branch contributions are scaled by 1e-6
    b = blocks[0]
    x = torch.randn(2, b.gamma.numel(), 9, 9)
    with torch.no_grad():
        assert (b(x) - x).abs().max() < 1e-4
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            assert torch.count_nonzero(m.bias) == 0
            if m.weight.numel() >= 100_000:  # large enough for a tight std estimate
                assert abs(m.weight.std().item() - 0.02) < 0.002 and m.weight.abs().max() < 0.2


def test_drop_path_module():
    torch.manual_seed(3)
    x = torch.rand(256, 3, 4, 4) + 0.5
    layer = DropPath(0.3)
    assert torch.equal(layer.eval()(x), x)
    y = layer.train()(x)
    kept = (y != 0).flatten(1)
    assert (kept.all(1) | (~kept).all(1)).all()  # whole samples, never parts
    k = kept.all(1)
    torch.testing.assert_close(y[k], x[k] / 0.7)
    assert 0.55 < k.float().mean() < 0.85  # ~70% kept
    with pytest.raises(ValueError, match="drop_path"):
        DropPath(1.0)


def test_block_drop_path_train_and_eval():
    torch.manual_seed(4)
    block = randomised_block(6, drop_path=0.5)
    x = torch.randn(64, 6, 5, 5)
    with torch.no_grad():
        ref = block_reference(block, x).float()
        torch.testing.assert_close(block.eval()(x), ref, atol=1e-4, rtol=1e-4)
        y = block.train()(x)
    dropped = (y == x).flatten(1).all(1)
    branch = ref - x
    kept = ~dropped
    torch.testing.assert_close(y[kept], x[kept] + branch[kept] / 0.5, atol=2e-4, rtol=1e-4)
    assert 0 < dropped.sum() < 64


def test_drop_path_rates_rise_linearly():
    model = build_backbone("convnext_atto", drop_path=0.2)
    rates = [m.drop_path.p for m in model.modules() if isinstance(m, ConvNeXtBlock)]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.2)
    steps = [b - a for a, b in zip(rates, rates[1:])]
    assert all(s == pytest.approx(0.2 / (len(rates) - 1)) for s in steps)


def test_layernorm2d_matches_channel_normalisation():
    torch.manual_seed(5)
    ln = LayerNorm2d(7, eps=1e-6)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.uniform_(-1, 1)
    x = torch.randn(2, 7, 5, 3, dtype=torch.float64)
    ref = (x - x.mean(1, keepdim=True)) / torch.sqrt(x.var(1, unbiased=False, keepdim=True) + 1e-6)
    ref = ref * ln.weight.double()[:, None, None] + ln.bias.double()[:, None, None]
    torch.testing.assert_close(ln.double()(x), ref)
    torch.testing.assert_close(ln(x.contiguous(memory_format=torch.channels_last)), ref)


# ---------------------------------------------------------------- ResNet specifics


def test_resnet_blocks_start_as_identity():
    """The last BN gamma of each residual branch is zero, so a block is relu(shortcut(x)) at init."""
    model = build_backbone("resnet50", width=0.25).eval()
    blocks = [m for m in model.modules() if isinstance(m, (BasicBlock, Bottleneck))]
    assert len(blocks) == 16
    assert all(torch.count_nonzero(b.branch[-1].weight) == 0 for b in blocks)
    block = build_backbone("resnet18").eval().stages[0][1]
    x = torch.randn(2, 64, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(block(x), F.relu(x))
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("name", NAMES)
def test_gradient_reaches_every_parameter(name):
    torch.manual_seed(6)
    model = build_backbone(name, width=0.5 if name == "convnext_t" else 1.0).train()
    with torch.no_grad():  # undo ResNet's zero-init gammas, which would (correctly) stop the branch grads
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d) and torch.count_nonzero(m.weight) == 0:
                m.weight.uniform_(0.5, 1.5)
    y = model(torch.randn(2, 3, 64, 64))
    (y * torch.randn_like(y)).sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, pname


# ---------------------------------------------------------------- errors


def test_unknown_name_lists_valid():
    with pytest.raises(ValueError) as info:
        build_backbone("vgg16")
    assert "vgg16" in str(info.value) and all(n in str(info.value) for n in NAMES)


@pytest.mark.parametrize("name", ["resnet18", "convnext_atto", "mobilenetv2"])
def test_bad_options(name):
    for width in (0, -0.5):
        with pytest.raises(ValueError, match="width"):
            build_backbone(name, width=width)
    for rate in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="drop_path"):
            build_backbone(name, drop_path=rate)
    with pytest.raises(ValueError, match="backend"):
        build_backbone(name, kernel_backend="cudnn")


# ---------------------------------------------------------------- memory format and the fused kernel


def test_channels_last_input_same_output():
    model = eval_model("convnext_atto")
    assert isinstance(model, ConvNeXt)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x.contiguous(memory_format=torch.channels_last)), model(x))


def test_block_triton_backend_matches_reference():
    """The real fused kernel (under TRITON_INTERPRET=1 on CPU), once kernels/dwconv.py exists."""
    pytest.importorskip("facefuse.kernels.dwconv")
    torch.manual_seed(7)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    block = randomised_block(12, backend="triton").to(device).eval()
    x = torch.randn(2, 12, 9, 11, device=device)
    with torch.no_grad():
        out = block(x).cpu().double()
    torch.testing.assert_close(out, block_reference(block.cpu(), x.cpu()), atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_convnext_cuda_triton_matches_torch():
    pytest.importorskip("facefuse.kernels.dwconv")
    torch.manual_seed(8)
    model = build_backbone("convnext_atto").cuda().to(memory_format=torch.channels_last).eval()
    x = torch.randn(4, 3, 112, 112, device="cuda").contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = model(x)
        model.set_kernel_backend("triton")
        out = model(x)
    torch.testing.assert_close(out, ref, atol=1e-3, rtol=1e-3)
