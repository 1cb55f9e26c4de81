"""Classification heads of trainer/losses/margin.py against float64 loop references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from facefuse.trainer.losses import CLASSIFICATION_HEADS, build_head
from facefuse.trainer.losses.margin import ArcFace, CombinedMargin, CosFace, NormFace, SoftmaxHead, SphereFace

SHAPES = [(6, 7, 5), (13, 32, 11)]  # (B, D, C)
DTYPES = [(torch.float32, 2e-4, 2e-5), (torch.float64, 1e-10, 1e-10)]  # (dtype, atol, rtol)
# name -> (build_head kwargs, (m1, m2, m3)) for the reference
MARGIN_CASES = {
    "normface": ({}, (1.0, 0.0, 0.0)),
    "arcface": ({"margin": 0.5}, (1.0, 0.5, 0.0)),
    "cosface": ({"margin": 0.35}, (1.0, 0.0, 0.35)),
    "sphereface": ({"margin": 1.35}, (1.35, 0.0, 0.0)),
    "combined": ({"m1": 1.2, "m2": 0.3, "m3": 0.1}, (1.2, 0.3, 0.1)),
}


def make_batch(batch, dim, classes, seed, dtype=torch.float64):
    """Embeddings near their class weight, opposite to it (theta near pi) and random, by thirds."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(classes, dim, generator=g, dtype=torch.float64)
    labels = torch.randint(0, classes, (batch,), generator=g)
    noise = torch.randn(batch, dim, generator=g, dtype=torch.float64)
    w, u = F.normalize(weight[labels], dim=1) * 3.0, F.normalize(noise, dim=1)
    side = (torch.arange(batch) % 3)[:, None]  # angles to the class weight ~0.5, ~pi - 0.26, random
    emb = torch.where(side == 0, w + 1.6 * u, torch.where(side == 1, -w + 0.8 * u, noise))
    return emb.to(dtype), weight.to(dtype), labels


def reference_loss(emb, weight, labels, s, m1, m2, m3, label_smoothing):
    """Per-row float64 loop with the math module: (mean loss, argmax of cos, rows past theta*)."""
    e = emb.detach().double().numpy()
    w = weight.detach().double().numpy()
    w = w / np.linalg.norm(w, axis=1, keepdims=True)
    total, preds, beyond = 0.0, [], 0
    theta_star = (math.pi - m2) / m1
    for i in range(e.shape[0]):
        x = e[i] / np.linalg.norm(e[i])
        cos = [float(np.dot(x, w[j])) for j in range(w.shape[0])]
        y = int(labels[i])
        c = min(max(cos[y], -1 + 1e-7), 1 - 1e-7)
        theta = math.acos(c)
        if theta <= theta_star:
            phi = math.cos(m1 * theta + m2) - m3
        else:
            phi = math.cos(theta) - math.cos(theta_star) - 1 - m3
            beyond += 1
        logits = [s * (phi if j == y else cos[j]) for j in range(len(cos))]
        top = max(logits)
        lse = top + math.log(sum(math.exp(v - top) for v in logits))
        nll = [lse - v for v in logits]
        total += (1 - label_smoothing) * nll[y] + label_smoothing * sum(nll) / len(nll)
        preds.append(int(np.argmax(cos)))
    return total / e.shape[0], preds, beyond


def head_with(name, weight, **kwargs):
    head = build_head(name, weight.shape[1], weight.shape[0], **kwargs).to(weight.dtype)
    with torch.no_grad():
        head.weight.copy_(weight)
    return head


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("batch,dim,classes", SHAPES)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("name", list(MARGIN_CASES))
def test_margin_head_matches_loop_reference(name, label_smoothing, batch, dim, classes, dtype, atol, rtol):
    kwargs, (m1, m2, m3) = MARGIN_CASES[name]
    emb, weight, labels = make_batch(batch, dim, classes, seed=batch * dim + classes, dtype=dtype)
    head = head_with(name, weight, s=30.0, label_smoothing=label_smoothing, **kwargs)
    assert head.margins == pytest.approx((m1, m2, m3))
    out = head(emb, labels)
    expected, preds, beyond = reference_loss(emb, weight, labels, 30.0, m1, m2, m3, label_smoothing)
    if (m2 > 0 or m1 > 1) and batch >= 6:
        assert beyond > 0, "the batch must exercise the theta > theta* branch"
    assert out.loss.dtype == dtype and out.loss.shape == ()
    torch.testing.assert_close(out.loss, torch.tensor(expected, dtype=dtype), atol=atol, rtol=rtol)
    assert out.preds.dtype == torch.int64 and out.preds.tolist() == preds


@pytest.mark.parametrize("batch,dim,classes", SHAPES)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_softmax_head_matches_linear_cross_entropy(batch, dim, classes, label_smoothing):
    emb, _, labels = make_batch(batch, dim, classes, seed=3)
    head = SoftmaxHead(dim, classes, label_smoothing=label_smoothing, dtype=torch.float64)
    out = head(emb, labels)
    w, b = head.linear.weight.detach().numpy(), head.linear.bias.detach().numpy()
    total = 0.0
    for i in range(batch):
        logits = w @ emb[i].numpy() + b
        logp = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
        total += -(1 - label_smoothing) * logp[labels[i]] - label_smoothing * logp.mean()
    torch.testing.assert_close(out.loss, torch.tensor(total / batch, dtype=torch.float64))
    assert out.preds.tolist() == (emb @ head.linear.weight.T + head.linear.bias).argmax(1).tolist()


def _loss_and_grads(head, emb, labels):
    emb = emb.clone().requires_grad_(True)
    loss = head(emb, labels).loss
    g_emb, g_w = torch.autograd.grad(loss, (emb, head.weight))
    return loss.detach(), g_emb, g_w


@pytest.mark.parametrize("batch,dim,classes", SHAPES)
def test_zero_margins_equal_normalised_softmax(batch, dim, classes):
    emb, weight, labels = make_batch(batch, dim, classes, seed=11)
    cos = F.normalize(emb, dim=1) @ F.normalize(weight, dim=1).T
    plain = F.cross_entropy(20.0 * cos, labels)
    normface = _loss_and_grads(head_with("normface", weight, s=20.0), emb, labels)
    torch.testing.assert_close(normface[0], plain)
    for name in ("arcface", "cosface"):
        other = _loss_and_grads(head_with(name, weight, s=20.0, margin=0.0), emb, labels)
        for a, b in zip(other, normface):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("batch,dim,classes", SHAPES)
@pytest.mark.parametrize(
    "name,margin,triple", [("arcface", 0.45, (1.0, 0.45, 0.0)), ("cosface", 0.3, (1.0, 0.0, 0.3)),
                           ("sphereface", 1.7, (1.7, 0.0, 0.0))],
)
def test_combined_margin_covers_the_single_margins(name, margin, triple, batch, dim, classes):
    emb, weight, labels = make_batch(batch, dim, classes, seed=5)
    single = _loss_and_grads(head_with(name, weight, s=16.0, margin=margin), emb, labels)
    m1, m2, m3 = triple
    combined = _loss_and_grads(head_with("combined", weight, s=16.0, m1=m1, m2=m2, m3=m3), emb, labels)
    for a, b in zip(single, combined):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("label_smoothing", [0.05, 0.3])
def test_label_smoothing_matches_torch_at_zero_margin(label_smoothing):
    emb, weight, labels = make_batch(13, 7, 11, seed=7)
    cos = F.normalize(emb, dim=1) @ F.normalize(weight, dim=1).T
    expected = F.cross_entropy(8.0 * cos, labels, label_smoothing=label_smoothing)
    for name in ("normface", "arcface", "cosface", "combined"):
        kwargs = {"margin": 0.0} if name in ("arcface", "cosface") else {}
        head = head_with(name, weight, s=8.0, label_smoothing=label_smoothing, **kwargs)
        torch.testing.assert_close(head(emb, labels).loss, expected)


@pytest.mark.parametrize(
    "head", [ArcFace(4, 3, margin=0.5), ArcFace(4, 3, margin=2.0), CosFace(4, 3, margin=0.4),
             SphereFace(4, 3, margin=1.35), SphereFace(4, 3, margin=4.0), CombinedMargin(4, 3, m1=1.3, m2=0.4, m3=0.2)],
    ids=repr,
)
def test_target_logit_is_continuous_and_decreasing(head):
    m1, m2, m3 = head.margins
    theta = torch.linspace(1e-3, math.pi - 1e-3, 4001, dtype=torch.float64)
    phi = head.target_logit(torch.cos(theta))
    assert torch.isfinite(phi).all()
    assert (phi.diff() < 0).all(), "phi must decrease strictly in theta"
    theta_star = (math.pi - m2) / m1
    if theta_star < math.pi:
        delta = 1e-6
        around = head.target_logit(torch.cos(torch.tensor([theta_star - delta, theta_star + delta], dtype=torch.float64)))
        assert abs(float(around[0] - around[1])) < 2 * max(m1, 1.0) * delta * 1.01
        torch.testing.assert_close(around, torch.full((2,), -1.0 - m3, dtype=torch.float64), atol=1e-5, rtol=0)
        # Past theta* the target logit keeps falling instead of rising back to cos(m1*pi + m2) - m3.
        assert float(phi[-1]) < -1.0 - m3


@pytest.mark.parametrize("name", list(CLASSIFICATION_HEADS))
def test_gradcheck_every_head(name):
    kwargs = dict(MARGIN_CASES.get(name, ({}, None))[0])
    emb, weight, labels = make_batch(6, 5, 4, seed=2)
    head = build_head(name, 5, 4, s=4.0, **kwargs).double()
    if name != "softmax":
        m1, m2, _ = head.margins
        cos_t = (F.normalize(emb, dim=1) * F.normalize(weight[labels], dim=1)).sum(1)
        theta = torch.acos(cos_t)
        assert (theta > 0.05).all() and ((theta - (math.pi - m2) / m1).abs() > 0.05).all()
    else:
        weight = head.linear.weight.detach().clone()
    params = ["linear.weight"] if name == "softmax" else ["weight"]

    def loss(e, w):
        return functional_call(head, {params[0]: w}, (e, labels)).loss

    assert torch.autograd.gradcheck(loss, (emb.requires_grad_(True), weight.requires_grad_(True)))


def test_build_head_defaults_and_weight_init():
    assert build_head("arcface", 32, 11).margins == (1.0, 0.5, 0.0)
    assert build_head("cosface", 32, 11).margins == (1.0, 0.0, 0.35)
    assert build_head("sphereface", 32, 11).margins == (1.35, 0.0, 0.0)
    assert build_head("normface", 32, 11, margin=0.3).margins == (1.0, 0.0, 0.0)
    assert build_head("combined", 32, 11, m1=1.1, m2=0.2, m3=0.05).margins == (1.1, 0.2, 0.05)
    assert isinstance(build_head("normface", 32, 11), NormFace)
    assert isinstance(build_head("softmax", 32, 11, margin=0.5), SoftmaxHead)
    head = build_head("arcface", 64, 97, s=32.0)
    assert head.s == 32.0 and head.weight.shape == (97, 64)
    assert 0.009 < float(head.weight.detach().std()) < 0.011 and abs(float(head.weight.detach().mean())) < 1e-3


@pytest.mark.parametrize(
    "kwargs,param",
    [
        ({"name": "arcface", "s": 0.0}, "s"),
        ({"name": "cosface", "s": -1.0}, "s"),
        ({"name": "arcface", "margin": math.pi}, "margin"),
        ({"name": "arcface", "margin": -0.1}, "margin"),
        ({"name": "cosface", "margin": -0.1}, "margin"),
        ({"name": "sphereface", "margin": 0.9}, "margin"),
        ({"name": "combined", "m1": 0.5}, "m1"),
        ({"name": "combined", "m2": 3.5}, "m2"),
        ({"name": "combined", "m3": -0.2}, "m3"),
        ({"name": "combined", "margin": 0.5}, "margin"),
        ({"name": "arcface", "m2": 0.5}, "m2"),
        ({"name": "arcface", "label_smoothing": 1.0}, "label_smoothing"),
        ({"name": "softmax", "label_smoothing": -0.1}, "label_smoothing"),
        ({"name": "arcface", "kernel_backend": "cuda"}, "backend"),
    ],
)
def test_build_head_rejects_bad_parameters(kwargs, param):
    kwargs = dict(kwargs)
    with pytest.raises(ValueError, match=param):
        build_head(kwargs.pop("name"), 8, 5, **kwargs)


def test_unknown_head_lists_valid_names_and_backend_is_checked():
    with pytest.raises(ValueError, match="arcface.*cosface"):
        build_head("magface", 8, 5)
    head = build_head("arcface", 8, 5, kernel_backend="triton")
    assert head.kernel_backend == "triton"
    head.kernel_backend = "torch"
    with pytest.raises(ValueError, match="kernel backend"):
        head.kernel_backend = "cuda"
    with pytest.raises(ValueError, match="labels"):
        head(torch.randn(4, 8), torch.tensor([0, 1, 2]))


def _margin_ce_module():
    try:
        from facefuse.kernels import margin_ce
    except ImportError as exc:
        pytest.skip(f"kernels.margin_ce not importable: {exc}")
    return margin_ce


@pytest.mark.parametrize("batch,dim,classes", SHAPES)
@pytest.mark.parametrize("name", list(MARGIN_CASES))
def test_torch_head_equals_kernel_reference(name, batch, dim, classes):
    margin_ce = _margin_ce_module()
    emb, weight, labels = make_batch(batch, dim, classes, seed=17)
    head = head_with(name, weight, s=24.0, label_smoothing=0.1, **MARGIN_CASES[name][0])
    m1, m2, m3 = head.margins
    expected = margin_ce.margin_cross_entropy_reference(
        emb, weight, labels, s=24.0, m1=m1, m2=m2, m3=m3, label_smoothing=0.1
    )
    torch.testing.assert_close(head(emb, labels).loss, expected)


@pytest.mark.parametrize("name", ["arcface", "sphereface", "combined"])
def test_triton_backend_equals_torch_backend(name):
    _margin_ce_module()
    emb, weight, labels = make_batch(13, 32, 11, seed=23, dtype=torch.float32)
    head = head_with(name, weight, s=24.0, **MARGIN_CASES[name][0])
    torch_out = _loss_and_grads(head, emb, labels)
    torch_preds = head(emb, labels).preds
    head.kernel_backend = "triton"
    triton_out = _loss_and_grads(head, emb, labels)
    for a, b in zip(triton_out, torch_out):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert head(emb, labels).preds.tolist() == torch_preds.tolist()
