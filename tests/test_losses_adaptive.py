"""AdaFace and sub-centre ArcFace (trainer/losses/adaptive.py) against their papers' formulas
written out here in numpy float64, element by element where the paper is in theta."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.func import functional_call

from facefuse.trainer.losses import HEADS, AdaFace, SubCenterArcFace, build_head


def _batch(b, d, rows, seed, norm_spread=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, generator=g, dtype=torch.float64)
    if norm_spread:  # feature norms from ~2 to ~30, so the quality proxy spans its range
        x = x * torch.linspace(0.3, 6.0, b, dtype=torch.float64)[:, None]
    w = torch.randn(rows, d, generator=g, dtype=torch.float64)
    return x, w


def _softmax_ce(logits, y, eps=0.0):
    z = logits - logits.max(1, keepdims=True)
    lse = np.log(np.exp(z).sum(1)) + logits.max(1)
    c = logits.shape[1]
    return float(np.mean(lse - (1 - eps) * logits[np.arange(len(y)), y] - eps / c * logits.sum(1)))


def adaface_reference(x, w, y, *, m, h, s, mu, sd):
    """Kim et al. 2022, eqs. 8-12 with the official code's clips: q from the norm, g_angle = -m q,
    g_add = m q + m, target cos(clip(theta + g_angle, eps, pi - eps)) - g_add."""
    x, w = x.numpy(), w.numpy()
    norms = np.clip(np.linalg.norm(x, axis=1), 1e-3, 100)
    q = np.clip(h * (norms - mu) / (sd + 1e-3), -1, 1)
    cos = (x / np.linalg.norm(x, axis=1, keepdims=True)) @ (w / np.linalg.norm(w, axis=1, keepdims=True)).T
    cos = np.clip(cos, -1 + 1e-3, 1 - 1e-3)
    logits = s * cos.copy()
    for i, yi in enumerate(y.tolist()):
        theta = math.acos(cos[i, yi])
        logits[i, yi] = s * (math.cos(min(max(theta - m * q[i], 1e-3), math.pi - 1e-3)) - (m * q[i] + m))
    return _softmax_ce(logits, y.numpy()), q


def test_adaface_equals_the_paper_and_updates_its_norm_statistics():
    x, w = _batch(12, 8, 5, seed=0)
    y = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1])
    head = AdaFace(8, 5, s=16.0, margin=0.4, t_alpha=0.5).double()
    with torch.no_grad():
        head.weight.copy_(w)
    norms = torch.linalg.vector_norm(x, dim=1)
    mu = 0.5 * 20.0 + 0.5 * float(norms.mean())
    sd = 0.5 * 100.0 + 0.5 * float(norms.std())  # unbiased, like torch.std / the official code
    loss = head(x, y).loss
    want, q = adaface_reference(x, w, y, m=0.4, h=0.333, s=16.0, mu=mu, sd=sd)
    assert abs(float(loss.detach()) - want) < 1e-10
    assert abs(float(head.norm_mean) - mu) < 1e-9 and abs(float(head.norm_std) - sd) < 1e-9
    assert q.min() < -0.05 and q.max() > 0.0  # the margins really differ from row to row
    # a second step uses the updated statistics; eval mode leaves them alone
    mu2 = 0.5 * mu + 0.5 * float(norms.mean())
    sd2 = 0.5 * sd + 0.5 * float(norms.std())
    assert abs(float(head(x, y).loss.detach()) - adaface_reference(x, w, y, m=0.4, h=0.333, s=16.0, mu=mu2, sd=sd2)[0]) < 1e-10
    head.eval()
    head(x, y)
    assert abs(float(head.norm_mean) - mu2) < 1e-9


def test_adaface_quality_extremes_are_arcface_and_cosface_like():
    """q = -1 (low quality): cos(theta + m); q = 0: cos(theta) - m, the paper's two anchors."""
    head = AdaFace(4, 3, s=1.0, margin=0.3, t_alpha=1.0).double().eval()
    x = torch.tensor([[0.9, 0.2, 0.1, 0.0]], dtype=torch.float64)
    w = torch.eye(3, 4, dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(w)
    y = torch.tensor([0])
    c = float(x[0, 0] / x.norm())
    others = [float(x[0, 1] / x.norm()), float(x[0, 2] / x.norm())]
    for norm_mean, want_target in ((1e6, math.cos(math.acos(c) + 0.3)),    # far below the mean: q = -1
                                   (float(x.norm()), c - 0.3)):             # at the mean: q = 0
        head.norm_mean.fill_(norm_mean)
        head.norm_std.fill_(1.0)
        logits = np.array([[want_target, *others]])
        assert abs(float(head(x, y).loss) - _softmax_ce(logits, np.array([0]))) < 1e-12


def subcenter_reference(x, w, y, *, k, m, s, eps):
    """Deng et al. 2020: cos_j = max over the K sub-centres of class j; ArcFace on the target,
    cos(theta + m) = c cos m - sin(theta) sin m (theta + m < pi in these data)."""
    x, w = x.numpy(), w.numpy()
    cos = (x / np.linalg.norm(x, axis=1, keepdims=True)) @ (w / np.linalg.norm(w, axis=1, keepdims=True)).T
    per_class = np.array([[max(row[j * k:(j + 1) * k]) for j in range(len(row) // k)] for row in cos])
    logits = s * per_class.copy()
    for i, yi in enumerate(y.tolist()):
        c = per_class[i, yi]
        assert math.acos(c) + m < math.pi
        logits[i, yi] = s * (c * math.cos(m) - math.sqrt(1 - c * c) * math.sin(m))
    return _softmax_ce(logits, y.numpy(), eps), per_class


@pytest.mark.parametrize("k,eps", [(3, 0.0), (2, 0.1), (1, 0.0)])
def test_subcenter_arcface_equals_the_paper(k, eps):
    classes = 4
    x, w = _batch(9, 6, classes * k, seed=k, norm_spread=False)
    if k > 1:  # every row leans along e1; class 0's first sub-centre is e1, its last -e1: never a best
        x[:, 0] += 4.0
        w[0], w[k - 1] = torch.eye(6, dtype=torch.float64)[0], -torch.eye(6, dtype=torch.float64)[0]
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 0])
    head = build_head("subcenter_arcface", 6, classes, s=8.0, label_smoothing=eps).double()
    assert isinstance(head, SubCenterArcFace) and head.subcenters == 3 and head.margin == 0.5
    head = SubCenterArcFace(6, classes, s=8.0, margin=0.5, subcenters=k, label_smoothing=eps).double()
    assert head.weight.shape == (classes * k, 6)
    with torch.no_grad():
        head.weight.copy_(w)
    xg = x.clone().requires_grad_(True)
    out = head(xg, y)
    want, per_class = subcenter_reference(x, w, y, k=k, m=0.5, s=8.0, eps=eps)
    assert abs(float(out.loss) - want) < 1e-10
    assert torch.equal(out.preds, torch.from_numpy(per_class.argmax(1)))
    out.loss.backward()
    if k > 1:  # a sub-centre that is no row's best for its class gets no gradient at all
        cos = torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(w, dim=1).T
        best = cos.view(9, classes, k).argmax(2)  # B x C: the winning sub-centre per (row, class)
        winners = {j * k + int(best[i, j]) for i in range(9) for j in range(classes)}
        losers = sorted(set(range(classes * k)) - winners)
        assert losers, "the data should leave some sub-centre unused"
        assert torch.all(head.weight.grad[losers] == 0)
        assert torch.all(head.weight.grad[sorted(winners)].abs().sum(1) > 0)


@pytest.mark.parametrize("name,q", [("adaface", -1.0), ("adaface", 1.0), ("subcenter_arcface", None)])
def test_gradcheck_and_registry(name, q):
    assert name in HEADS.names()
    x, _ = _batch(6, 5, 1, seed=3)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    head = build_head(name, 5, 4, s=4.0).double()
    if name == "adaface":
        # the paper detaches the norms (no gradient through the margins), so gradcheck needs q
        # constant near x: frozen statistics with every row's q clipped at -1 and at +1
        head.eval()
        head.norm_mean.fill_(1e6 if q < 0 else 0.0)
        head.norm_std.fill_(1e-3)
    w = head.weight.detach().clone()

    def loss(e, weight):
        return functional_call(head, {"weight": weight}, (e, y)).loss

    assert torch.autograd.gradcheck(loss, (x.requires_grad_(True), w.requires_grad_(True)))


@pytest.mark.parametrize("kwargs,match", [
    ({"margin": 1.2}, "margin must be in"),
    ({"h": 0.0}, "h must be > 0"),
    ({"t_alpha": 0.0}, "t_alpha must be in"),
    ({"s": -1.0}, "s must be"),
])
def test_adaface_rejects_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdaFace(4, 3, **kwargs)


def test_subcenter_rejects_bad_counts_and_heads_refuse_easy_margin():
    with pytest.raises(ValueError, match="subcenters must be an integer >= 1"):
        SubCenterArcFace(4, 3, subcenters=0)
    with pytest.raises(ValueError, match="easy_margin"):
        build_head("adaface", 4, 3, easy_margin=True)


def test_head_options_reach_the_head_and_foreign_ones_are_refused():
    head = build_head("subcenter_arcface", 4, 3, subcenters=2)
    assert head.subcenters == 2 and tuple(head.weight.shape) == (6, 4)
    ada = build_head("adaface", 4, 3, h=0.5, t_alpha=0.1)
    assert (ada.h, ada.t_alpha) == (0.5, 0.1)
    with pytest.raises(ValueError, match="subcenters: not a setting of the 'adaface' head; valid: h, t_alpha"):
        build_head("adaface", 4, 3, subcenters=2)
    with pytest.raises(ValueError, match="h: not a setting of the 'arcface' head; valid: none"):
        build_head("arcface", 4, 3, h=0.5)


def test_head_options_from_the_config_build_the_model():
    from facefuse.trainer.config import resolve_config
    from facefuse.trainer.model import build_face_model

    cfg = resolve_config(None, {"loss.name": "subcenter_arcface", "loss.head_options.subcenters": 4,
                                "model.backbone": "mobilenetv2", "model.width": 0.25, "model.image_size": 32},
                         {})
    model = build_face_model(cfg.model, cfg.loss, num_classes=5)
    assert model.head.subcenters == 4 and model.head.weight.shape[0] == 20
