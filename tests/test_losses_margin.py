"""Classification heads of trainer/losses/margin.py and the margin math of kernels/margin.py against
textbook formulas written out here (float64, element by element with the math module)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from facefuse.core.registry import UnknownNameError
from facefuse.kernels.margin import MARGINS, target_logit, target_slope
from facefuse.trainer.losses import CLASSIFICATION_HEADS, HEADS, build_head
from facefuse.trainer.losses.margin import MarginHead, NormFace, SoftmaxHead

SHAPES = [(6, 7, 5), (13, 32, 11)]  # (B, D, C)
DTYPES = [(torch.float32, 2e-4, 2e-5), (torch.float64, 1e-10, 1e-10)]  # (dtype, atol, rtol)


# ------------------------------------------------------------------------------------------------
# Textbook target logits, one Python float at a time, straight from the papers (independent of
# kernels/margin.py: no shared code, and acos only where the paper's formula is in theta).
# Past theta* they use the continuation documented in kernels/margin.py: c - cos(theta*) - 1 - m3.
# ------------------------------------------------------------------------------------------------
def clamp(c):
    return min(max(c, -1 + 1e-7), 1 - 1e-7)


def arcface_phi(m, easy_margin=False):
    """Deng et al. 2019: cos(theta + m) = c cos m - sin(theta) sin m, for theta <= pi - m."""
    def phi(cos):
        c = clamp(cos)
        if easy_margin and c <= 0:  # insightface: cos(theta + m) if cos > 0 else cos
            return c
        if c >= math.cos(math.pi - m):
            return c * math.cos(m) - math.sqrt(1 - c * c) * math.sin(m)
        return c + math.cos(m) - 1  # continuation: c - cos(pi - m) - 1
    return phi


def cosface_phi(m, easy_margin=False):
    """Wang et al. 2018: cos(theta) - m (decreasing on all of (0, pi): no continuation)."""
    def phi(cos):
        c = clamp(cos)
        return c if easy_margin and c <= 0 else c - m
    return phi


def sphereface_phi(m):
    """Liu et al. 2017 (insightface's normalised form): cos(m theta) for theta <= pi/m.  For an
    integer m this is the Chebyshev polynomial T_m(c), the paper's own way of writing it."""
    def phi(cos):
        c = clamp(cos)
        if c < math.cos(math.pi / m):
            return c - math.cos(math.pi / m) - 1  # continuation
        if float(m).is_integer():
            return float(np.polynomial.chebyshev.chebval(c, [0.0] * int(m) + [1.0]))
        return math.cos(m * math.acos(c))
    return phi


def combined_phi(m1, m2, m3, easy_margin=False):
    """insightface's combined margin cos(m1 theta + m2) - m3 for theta <= (pi - m2) / m1."""
    def phi(cos):
        c = clamp(cos)
        if easy_margin and c <= 0:
            return c
        theta, theta_star = math.acos(c), (math.pi - m2) / m1
        if theta <= theta_star:
            return math.cos(m1 * theta + m2) - m3
        return c - math.cos(theta_star) - 1 - m3
    return phi


def normface_phi(cos):
    return clamp(cos)


# case -> (head name, build_head kwargs, (m1, m2, m3), textbook phi)
MARGIN_CASES = {
    "normface": ("normface", {}, (1.0, 0.0, 0.0), normface_phi),
    "arcface": ("arcface", {"margin": 0.5}, (1.0, 0.5, 0.0), arcface_phi(0.5)),
    "cosface": ("cosface", {"margin": 0.35}, (1.0, 0.0, 0.35), cosface_phi(0.35)),
    "sphereface": ("sphereface", {"margin": 1.35}, (1.35, 0.0, 0.0), sphereface_phi(1.35)),
    "sphereface2": ("sphereface", {"margin": 2.0}, (2.0, 0.0, 0.0), sphereface_phi(2)),
    "sphereface4": ("sphereface", {"margin": 4.0}, (4.0, 0.0, 0.0), sphereface_phi(4)),
    "combined": ("combined", {"m1": 1.2, "m2": 0.3, "m3": 0.1}, (1.2, 0.3, 0.1), combined_phi(1.2, 0.3, 0.1)),
    "arcface-easy": ("arcface", {"margin": 0.5, "easy_margin": True}, (1.0, 0.5, 0.0), arcface_phi(0.5, True)),
    "cosface-easy": ("cosface", {"margin": 0.35, "easy_margin": True}, (1.0, 0.0, 0.35), cosface_phi(0.35, True)),
    "combined-easy": ("combined", {"m1": 1.2, "m2": 0.3, "m3": 0.1, "easy_margin": True}, (1.2, 0.3, 0.1),
                      combined_phi(1.2, 0.3, 0.1, True)),
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


def textbook_loss(emb, weight, labels, s, phi, label_smoothing):
    """Per-row float64 loop with the math module: (per-row losses, argmax of cos, target cosines)."""
    e = emb.detach().double().numpy()
    w = weight.detach().double().numpy()
    w = w / np.linalg.norm(w, axis=1, keepdims=True)
    rows, preds, targets = [], [], []
    for i in range(e.shape[0]):
        x = e[i] / np.linalg.norm(e[i])
        cos = [float(np.dot(x, w[j])) for j in range(w.shape[0])]
        y = int(labels[i])
        logits = [s * (phi(cos[y]) if j == y else cos[j]) for j in range(len(cos))]
        top = max(logits)
        lse = top + math.log(sum(math.exp(v - top) for v in logits))
        nll = [lse - v for v in logits]
        rows.append((1 - label_smoothing) * nll[y] + label_smoothing * sum(nll) / len(nll))
        preds.append(int(np.argmax(cos)))
        targets.append(cos[y])
    return rows, preds, targets


def head_with(name, weight, **kwargs):
    head = build_head(name, weight.shape[1], weight.shape[0], **kwargs).to(weight.dtype)
    with torch.no_grad():
        head.weight.copy_(weight)
    return head


def check_coverage(case, targets):
    """The batch exercises the continuation (theta > theta*) and, with easy_margin, both sides of 0."""
    _, kwargs, (m1, m2, _), _ = MARGIN_CASES[case]
    theta_star = (math.pi - m2) / m1
    if theta_star < math.pi:
        assert any(math.acos(clamp(c)) > theta_star for c in targets), "no row past theta*"
    if kwargs.get("easy_margin"):
        assert min(targets) <= 0 < max(targets), "easy_margin needs targets on both sides of cos = 0"


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("batch,dim,classes", SHAPES)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("case", list(MARGIN_CASES))
def test_margin_head_matches_textbook(case, label_smoothing, batch, dim, classes, dtype, atol, rtol):
    name, kwargs, triple, phi = MARGIN_CASES[case]
    emb, weight, labels = make_batch(batch, dim, classes, seed=batch * dim + classes, dtype=dtype)
    head = head_with(name, weight, s=30.0, label_smoothing=label_smoothing, **kwargs)
    assert head.margins == pytest.approx(triple)
    out = head(emb, labels)
    rows, preds, targets = textbook_loss(emb, weight, labels, 30.0, phi, label_smoothing)
    if batch >= 6:
        check_coverage(case, targets)
    assert out.loss.dtype == dtype and out.loss.shape == ()
    torch.testing.assert_close(out.loss, torch.tensor(np.mean(rows), dtype=dtype), atol=atol, rtol=rtol)
    assert out.preds.dtype == torch.int64 and out.preds.tolist() == preds


@pytest.mark.parametrize("case", list(MARGIN_CASES))
def test_kernel_reference_matches_textbook(case):
    margin_ce = _margin_ce_module()
    _, kwargs, (m1, m2, m3), phi = MARGIN_CASES[case]
    emb, weight, labels = make_batch(13, 32, 11, seed=29)
    _, per_row, _ = margin_ce.margin_cross_entropy_reference(
        emb, weight, labels, s=30.0, m1=m1, m2=m2, m3=m3, easy_margin=kwargs.get("easy_margin", False),
        label_smoothing=0.1, return_per_row=True)
    rows, _, targets = textbook_loss(emb, weight, labels, 30.0, phi, 0.1)
    check_coverage(case, targets)
    torch.testing.assert_close(per_row, torch.tensor(rows, dtype=torch.float64), atol=1e-10, rtol=1e-10)


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


@pytest.mark.parametrize("label_smoothing", [0.05, 0.3])
def test_label_smoothing_matches_torch_at_zero_margin(label_smoothing):
    emb, weight, labels = make_batch(13, 7, 11, seed=7)
    cos = F.normalize(emb, dim=1) @ F.normalize(weight, dim=1).T
    expected = F.cross_entropy(8.0 * cos, labels, label_smoothing=label_smoothing)
    for name in ("normface", "arcface", "cosface", "combined"):
        kwargs = {"margin": 0.0} if name in ("arcface", "cosface") else {}
        head = head_with(name, weight, s=8.0, label_smoothing=label_smoothing, **kwargs)
        torch.testing.assert_close(head(emb, labels).loss, expected)


SETTINGS = [("arcface", 0.5), ("arcface", 2.0), ("cosface", 0.4), ("sphereface", 1.35), ("sphereface", 4.0),
            ("combined", (1.3, 0.4, 0.2))]


def setting_margins(name, margin):
    return margin if name == "combined" else MARGINS[name].margins(margin)


@pytest.mark.parametrize("name,margin", SETTINGS)
def test_target_logit_is_continuous_and_decreasing(name, margin):
    m1, m2, m3 = setting_margins(name, margin)
    theta = torch.linspace(1e-3, math.pi - 1e-3, 4001, dtype=torch.float64)
    phi = target_logit(torch.cos(theta), m1, m2, m3)
    assert torch.isfinite(phi).all()
    assert (phi.diff() < 0).all(), "phi must decrease strictly in theta"
    theta_star = (math.pi - m2) / m1
    if theta_star < math.pi:
        delta = 1e-6
        around = target_logit(torch.cos(torch.tensor([theta_star - delta, theta_star + delta], dtype=torch.float64)),
                              m1, m2, m3)
        assert abs(float(around[0] - around[1])) < 2 * max(m1, 1.0) * delta * 1.01
        torch.testing.assert_close(around, torch.full((2,), -1.0 - m3, dtype=torch.float64), atol=1e-5, rtol=0)
        # Past theta* the target logit keeps falling instead of rising back to cos(m1*pi + m2) - m3.
        assert float(phi[-1]) < -1.0 - m3


@pytest.mark.parametrize("easy_margin", [False, True])
@pytest.mark.parametrize("name,margin", SETTINGS)
def test_target_slope_is_the_derivative_of_target_logit(name, margin, easy_margin):
    """The written-out dphi/dcos (used by the fused backward) against autograd of phi, float64, on
    both branches, both sides of cos = 0, and at and beyond the clamp edges (slope 0 there)."""
    m1, m2, m3 = setting_margins(name, margin)
    theta = torch.linspace(1e-3, math.pi - 1e-3, 997, dtype=torch.float64)
    theta = theta[(theta - (math.pi - m2) / m1).abs() > 1e-6]  # away from the kink at theta*
    edges = torch.tensor([1.0, 1 - 1e-8, -1 + 1e-8, -1.0, 1 - 1e-6, -1 + 1e-6], dtype=torch.float64)
    cos = torch.cat([torch.cos(theta), edges]).requires_grad_(True)
    (autograd,) = torch.autograd.grad(target_logit(cos, m1, m2, m3, easy_margin).sum(), cos)
    slope = target_slope(cos.detach(), m1, m2, m3, easy_margin)
    torch.testing.assert_close(slope, autograd, atol=1e-9, rtol=1e-9)
    assert (slope[-6:-2] == 0).all() and (slope[-2:] != 0).all()


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("m", [0.3, 0.5, 0.8])
def test_continuation_versus_insightface_fallback(m, label_smoothing):
    """Rows with theta > pi - m: our loss is lower than with insightface's fallback cos - m sin m
    by s * (m sin m - (1 - cos m)) (times the target logit's weight 1 - eps + eps/C), as derived in
    kernels/margin.py; the other rows agree."""
    margin_ce = _margin_ce_module()
    s, batch, dim, classes = 64.0, 9, 16, 7
    emb, weight, labels = make_batch(batch, dim, classes, seed=31)

    def insightface_phi(cos):  # arcface_torch's ArcFace, easy_margin=False
        c = clamp(cos)
        if c > math.cos(math.pi - m):
            return c * math.cos(m) - math.sqrt(1 - c * c) * math.sin(m)
        return c - m * math.sin(m)

    theirs, _, targets = textbook_loss(emb, weight, labels, s, insightface_phi, label_smoothing)
    _, ours, _ = margin_ce.margin_cross_entropy_reference(emb, weight, labels, s=s, m1=1.0, m2=m, m3=0.0,
                                                          label_smoothing=label_smoothing, return_per_row=True)
    head_loss = head_with("arcface", weight, s=s, margin=m, label_smoothing=label_smoothing)(emb, labels).loss
    torch.testing.assert_close(head_loss, ours.mean())
    affected = torch.tensor([math.acos(clamp(c)) > math.pi - m for c in targets])
    assert 0 < int(affected.sum()) < batch
    weight_y = 1 - label_smoothing + label_smoothing / classes
    gap = s * (m * math.sin(m) - (1 - math.cos(m))) * weight_y
    expected = torch.tensor(theirs, dtype=torch.float64) - gap * affected.double()
    torch.testing.assert_close(ours, expected, atol=1e-9, rtol=1e-12)


@pytest.mark.parametrize("name", [n for n in HEADS.names() if issubclass(HEADS.get(n), (MarginHead, SoftmaxHead))])
def test_gradcheck_every_head(name):  # AdaFace and sub-centre ArcFace: tests/test_losses_adaptive.py
    case = next((c for c in MARGIN_CASES.values() if c[0] == name), (name, {}))
    kwargs = dict(case[1])
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
    assert build_head("sphereface", 32, 11).margin == 1.35 and build_head("normface", 32, 11).margin is None
    assert isinstance(build_head("normface", 32, 11), NormFace)
    assert isinstance(build_head("softmax", 32, 11, margin=0.5), SoftmaxHead)
    assert build_head("arcface", 32, 11, easy_margin=True).easy_margin
    assert not build_head("combined", 32, 11).easy_margin
    head = build_head("arcface", 64, 97, s=32.0)
    assert head.s == 32.0 and head.weight.shape == (97, 64)
    assert 0.009 < float(head.weight.detach().std()) < 0.011 and abs(float(head.weight.detach().mean())) < 1e-3


@pytest.mark.parametrize("name", list(MARGINS))
def test_named_heads_are_their_settings(name):
    """Each named head is a registration of MARGINS[name] at its default margin."""
    assert name in HEADS
    assert build_head(name, 8, 5).margins == MARGINS[name].margins()


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
        ({"name": "softmax", "easy_margin": True}, "easy_margin"),
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
    assert CLASSIFICATION_HEADS is HEADS
    assert HEADS.names() == ["softmax", "normface", "arcface", "cosface", "sphereface", "combined", "adaface",
                             "subcenter_arcface"]
    with pytest.raises(UnknownNameError, match="unknown classification head 'magface'; valid: softmax, normface"):
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
@pytest.mark.parametrize("case", list(MARGIN_CASES))
def test_torch_head_equals_kernel_reference(case, batch, dim, classes):
    margin_ce = _margin_ce_module()
    name, kwargs, _, _ = MARGIN_CASES[case]
    emb, weight, labels = make_batch(batch, dim, classes, seed=17)
    head = head_with(name, weight, s=24.0, label_smoothing=0.1, **kwargs)
    m1, m2, m3 = head.margins
    expected = margin_ce.margin_cross_entropy_reference(
        emb, weight, labels, s=24.0, m1=m1, m2=m2, m3=m3, easy_margin=head.easy_margin, label_smoothing=0.1
    )
    torch.testing.assert_close(head(emb, labels).loss, expected)


@pytest.mark.parametrize("case", ["arcface", "sphereface", "combined", "arcface-easy"])
def test_triton_backend_equals_torch_backend(case):
    _margin_ce_module()
    name, kwargs, _, _ = MARGIN_CASES[case]
    emb, weight, labels = make_batch(13, 32, 11, seed=23, dtype=torch.float32)
    head = head_with(name, weight, s=24.0, **kwargs)
    torch_out = _loss_and_grads(head, emb, labels)
    torch_preds = head(emb, labels).preds
    head.kernel_backend = "triton"
    triton_out = _loss_and_grads(head, emb, labels)
    for a, b in zip(triton_out, torch_out):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert head(emb, labels).preds.tolist() == torch_preds.tolist()
