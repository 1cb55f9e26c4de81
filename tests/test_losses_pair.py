"""Pair losses and miners of trainer/losses/{pair,miners}.py against float64 loop references."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from torch.func import functional_call

from facefuse.core.registry import UnknownNameError
from facefuse.trainer.losses import (
    MINERS,
    PAIR_LOSSES,
    PairIndices,
    PairLoss,
    TripletIndices,
    build_pair_loss,
    pair_loss_settings,
)
from facefuse.trainer.losses.miners import all_pairs, batch_hard_triplets, semi_hard_triplets
from facefuse.trainer.losses.pair import CenterLoss, CircleLoss, circle_loss_from_similarity, cosine_similarity_matrix

SHAPES = [(6, 7, 5), (13, 32, 11), (13, 7, 5)]  # (B, D, C)
DTYPES = [(torch.float32, 1e-5, 1e-5), (torch.float64, 1e-10, 1e-10)]  # (dtype, atol, rtol)


def make_batch(batch, dim, classes, seed, dtype=torch.float64):
    """Random embeddings; labels with repeated classes and at least two distinct classes."""
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(batch, dim, generator=g, dtype=torch.float64)
    half = (batch + 1) // 2
    base = torch.randint(0, classes, (half,), generator=g)
    labels = torch.cat([base, base[torch.randperm(half, generator=g)][: batch - half]])
    labels = labels[torch.randperm(batch, generator=g)]
    if labels.unique().numel() < 2:
        labels[0] = (labels[1] + 1) % classes
    return emb.to(dtype), labels


def cos_np(emb):
    x = emb.detach().double().numpy()
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    return x @ x.T


def positives(y, a):
    return [j for j in range(len(y)) if j != a and y[j] == y[a]]


def negatives(y, a):
    return [j for j in range(len(y)) if y[j] != y[a]]


def ref_batch_hard(emb, labels, margin):
    d, y = 1 - cos_np(emb), labels.tolist()
    losses = []
    for a in range(len(y)):
        pos, neg = positives(y, a), negatives(y, a)
        if pos and neg:
            losses.append(max(0.0, max(d[a, p] for p in pos) - min(d[a, n] for n in neg) + margin))
    return sum(losses) / len(losses)


def ref_semi_hard(d, y, margin):
    """(chosen triplets, how many came from the band, how many from the fallback)."""
    chosen, band_count, fallback_count = [], 0, 0
    for a in range(len(y)):
        for p in positives(y, a):
            band = [n for n in negatives(y, a) if d[a, p] < d[a, n] < d[a, p] + margin]
            hard = [n for n in negatives(y, a) if d[a, n] <= d[a, p]]
            if band:
                chosen.append((a, p, min(band, key=lambda n: d[a, n])))
                band_count += 1
            elif hard:
                chosen.append((a, p, max(hard, key=lambda n: d[a, n])))
                fallback_count += 1
    return chosen, band_count, fallback_count


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("batch,dim,classes", SHAPES)
def test_triplet_batch_hard_matches_brute_force(batch, dim, classes, dtype, atol, rtol):
    emb, labels = make_batch(batch, dim, classes, seed=batch + dim, dtype=dtype)
    loss = build_pair_loss("triplet", dim, classes, margin=0.2, mining="batch_hard")(emb, labels)
    expected = ref_batch_hard(emb, labels, 0.2)
    assert expected > 0
    torch.testing.assert_close(loss, torch.tensor(expected, dtype=dtype), atol=atol, rtol=rtol)


@pytest.mark.parametrize("batch,dim,classes", SHAPES)
@pytest.mark.parametrize("margin", [0.05, 0.3])
def test_semi_hard_selection_matches_brute_force(batch, dim, classes, margin):
    emb, labels = make_batch(batch, dim, classes, seed=3 * batch + dim)
    dist = 1 - cosine_similarity_matrix(emb)
    mined = semi_hard_triplets(dist, labels, margin)
    assert isinstance(mined, TripletIndices)
    chosen, band, fallback = ref_semi_hard(dist.numpy(), labels.tolist(), margin)
    assert sorted(zip(*(t.tolist() for t in mined))) == sorted(chosen)
    assert band + fallback == len(chosen) > 0
    loss = build_pair_loss("triplet", dim, classes, margin=margin, mining="semi_hard")(emb, labels)
    d = dist.numpy()
    expected = np.mean([max(0.0, d[a, p] - d[a, n] + margin) for a, p, n in chosen])
    torch.testing.assert_close(loss, torch.tensor(expected, dtype=torch.float64))


def test_semi_hard_uses_band_and_fallback():
    emb, labels = make_batch(13, 7, 5, seed=1)
    dist = (1 - cosine_similarity_matrix(emb)).numpy()
    _, band, fallback = ref_semi_hard(dist, labels.tolist(), 0.3)
    assert band > 0 and fallback > 0, "the seed must exercise both rules"


@pytest.mark.parametrize("batch,dim,classes", SHAPES[:2])
def test_triplet_all_matches_loop(batch, dim, classes):
    emb, labels = make_batch(batch, dim, classes, seed=9)
    d, y = 1 - cos_np(emb), labels.tolist()
    terms = [max(0.0, d[a, p] - d[a, n] + 0.2) for a in range(batch) for p in positives(y, a) for n in negatives(y, a)]
    loss = build_pair_loss("triplet", dim, classes, mining="all")(emb, labels)
    torch.testing.assert_close(loss, torch.tensor(np.mean(terms), dtype=torch.float64))


def test_batch_hard_miner_returns_typed_hardest_indices():
    emb, labels = make_batch(13, 7, 5, seed=4)
    dist = 1 - cosine_similarity_matrix(emb)
    mined = batch_hard_triplets(dist, labels)
    assert isinstance(mined, TripletIndices) and mined.anchor.dtype == torch.int64
    y, d = labels.tolist(), dist.numpy()
    for a, p, n in zip(*(t.tolist() for t in mined)):
        assert p == max(positives(y, a), key=lambda j: d[a, j]) and n == min(negatives(y, a), key=lambda j: d[a, j])
    pairs = all_pairs(labels)
    assert isinstance(pairs, PairIndices)
    assert (labels[pairs.a1] == labels[pairs.p]).all() and (pairs.a1 != pairs.p).all()
    assert (labels[pairs.a2] != labels[pairs.n]).all()
    assert pairs.a1.numel() + pairs.a2.numel() + 13 == 13 * 13


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("batch,dim,classes", SHAPES)
def test_supcon_matches_loop(batch, dim, classes, dtype, atol, rtol):
    emb, labels = make_batch(batch, dim, classes, seed=batch * 7, dtype=dtype)
    s, y, t = cos_np(emb), labels.tolist(), 0.1
    per_anchor = []
    for i in range(batch):
        pos = positives(y, i)
        if not pos:
            continue
        log_denom = math.log(sum(math.exp(s[i, a] / t) for a in range(batch) if a != i))
        per_anchor.append(-sum(s[i, p] / t - log_denom for p in pos) / len(pos))
    loss = build_pair_loss("supcon", dim, classes)(emb, labels)
    torch.testing.assert_close(loss, torch.tensor(np.mean(per_anchor), dtype=dtype), atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("batch,dim,classes", SHAPES)
def test_npair_matches_loop(batch, dim, classes, dtype, atol, rtol):
    emb, labels = make_batch(batch, dim, classes, seed=batch * 5 + 1, dtype=dtype)
    s, y, t = cos_np(emb), labels.tolist(), 0.1
    anchors, poss = [], []
    for c in sorted(set(y)):
        members = [i for i in range(batch) if y[i] == c]
        if len(members) >= 2:
            anchors.append(members[0])
            poss.append(members[1])
    assert len(anchors) >= 2
    terms = []
    for i, a in enumerate(anchors):
        log_denom = math.log(sum(math.exp(s[a, p] / t) for p in poss))
        terms.append(log_denom - s[a, poss[i]] / t)
    loss = build_pair_loss("npair", dim, classes)(emb, labels)
    torch.testing.assert_close(loss, torch.tensor(np.mean(terms), dtype=dtype), atol=atol, rtol=rtol)


def ref_circle(s, y, m, gamma):
    def lse(values):
        top = max(values)
        return top + math.log(sum(math.exp(v - top) for v in values))

    terms = []
    for i in range(len(y)):
        pos, neg = positives(y, i), negatives(y, i)
        if pos and neg:
            lp = [-gamma * max(0.0, 1 + m - s[i, j]) * (s[i, j] - (1 - m)) for j in pos]
            ln = [gamma * max(0.0, s[i, j] + m) * (s[i, j] - m) for j in neg]
            terms.append(float(np.logaddexp(0.0, lse(lp) + lse(ln))))
    return float(np.mean(terms))


@pytest.mark.parametrize("dtype,atol,rtol", [(torch.float32, 1e-3, 1e-5), (torch.float64, 1e-9, 1e-10)])
@pytest.mark.parametrize("batch,dim,classes", SHAPES)
@pytest.mark.parametrize("m,gamma", [(0.25, 256.0), (0.4, 32.0)])
def test_circle_matches_loop(m, gamma, batch, dim, classes, dtype, atol, rtol):
    emb, labels = make_batch(batch, dim, classes, seed=batch * 3 + dim, dtype=dtype)
    loss = build_pair_loss("circle", dim, classes, m=m, gamma=gamma)(emb, labels)
    expected = ref_circle(cos_np(emb), labels.tolist(), m, gamma)
    torch.testing.assert_close(loss, torch.tensor(expected, dtype=dtype), atol=atol, rtol=rtol)


def test_circle_detached_weights_give_the_papers_gradient():
    """With a_p, a_n constant: dL/ds_p = sigma(Z)/N * softmax_p * (-gamma a_p), same for s_n."""
    g = torch.Generator().manual_seed(0)
    sim = (torch.rand(13, 13, generator=g, dtype=torch.float64) * 2 - 1).requires_grad_(True)
    labels = make_batch(13, 3, 5, seed=2)[1]
    m, gamma = 0.25, 16.0
    grad = torch.autograd.grad(circle_loss_from_similarity(sim, labels, m, gamma, True), sim)[0]
    s, y = sim.detach().numpy(), labels.tolist()
    expected = np.zeros_like(s)
    valid = [i for i in range(13) if positives(y, i) and negatives(y, i)]
    for i in valid:
        pos, neg = positives(y, i), negatives(y, i)
        ap = np.array([max(0.0, 1 + m - s[i, j]) for j in pos])
        an = np.array([max(0.0, s[i, j] + m) for j in neg])
        lp = -gamma * ap * (s[i, pos] - (1 - m))
        ln = gamma * an * (s[i, neg] - m)
        z = np.logaddexp.reduce(lp) + np.logaddexp.reduce(ln)
        outer = 1 / (1 + math.exp(-z)) / len(valid)
        expected[i, pos] = outer * np.exp(lp - np.logaddexp.reduce(lp)) * (-gamma * ap)
        expected[i, neg] = outer * np.exp(ln - np.logaddexp.reduce(ln)) * (gamma * an)
    torch.testing.assert_close(grad, torch.from_numpy(expected))
    full = torch.autograd.grad(circle_loss_from_similarity(sim, labels, m, gamma, False), sim)[0]
    assert not torch.allclose(full, grad), "the full derivative differs from the detached one"


@pytest.mark.parametrize("batch,dim,classes", SHAPES)
def test_center_loss_value_and_center_gradients(batch, dim, classes):
    emb, labels = make_batch(batch, dim, classes, seed=batch + 2)
    loss_fn = build_pair_loss("center", dim, classes, lr=0.3).double()
    assert loss_fn.lr == 0.3 and CenterLoss(embedding_dim=dim, num_classes=classes).lr is None
    assert isinstance(loss_fn.centers, torch.nn.Parameter) and loss_fn.centers.shape == (classes, dim)
    x = emb.numpy() / np.linalg.norm(emb.numpy(), axis=1, keepdims=True)
    c = loss_fn.centers.detach().numpy()
    expected = sum(0.5 * float(np.sum((x[i] - c[labels[i]]) ** 2)) for i in range(batch)) / batch
    loss = loss_fn(emb, labels)
    torch.testing.assert_close(loss, torch.tensor(expected, dtype=torch.float64))
    loss.backward()
    expected_grad = np.zeros_like(c)
    for i in range(batch):
        expected_grad[labels[i]] += (c[labels[i]] - x[i]) / batch
    torch.testing.assert_close(loss_fn.centers.grad, torch.from_numpy(expected_grad))
    present = torch.zeros(classes, dtype=torch.bool)
    present[labels] = True
    assert (loss_fn.centers.grad[present].abs().sum(1) > 0).all()


GRADCHECK_LOSSES = {
    **{f"triplet-{miner}": ("triplet", {"margin": 0.6, "mining": miner}) for miner in MINERS.names()},
    "npair": ("npair", {"temperature": 0.5}),
    "circle-full": ("circle", {"m": 0.25, "gamma": 8.0, "detach_weights": False}),
    "supcon": ("supcon", {"temperature": 0.5}),
}


@pytest.mark.parametrize("case", list(GRADCHECK_LOSSES))
def test_gradcheck_pair_losses(case):
    name, kwargs = GRADCHECK_LOSSES[case]
    emb, _ = make_batch(6, 5, 3, seed=8)
    labels = torch.tensor([0, 1, 0, 2, 1, 2])
    loss_fn = build_pair_loss(name, 5, 3, **kwargs)
    assert float(loss_fn(emb, labels)) > 0
    assert torch.autograd.gradcheck(lambda e: loss_fn(e, labels), (emb.requires_grad_(True),))


def test_gradcheck_center_loss():
    emb, labels = make_batch(6, 5, 3, seed=8)
    loss_fn = CenterLoss(embedding_dim=5, num_classes=3, dtype=torch.float64)
    centers = loss_fn.centers.detach().clone().requires_grad_(True)

    def loss(e, c):
        return functional_call(loss_fn, {"centers": c}, (e, labels))

    assert torch.autograd.gradcheck(loss, (emb.requires_grad_(True), centers))


NO_TUPLE_CASES = [
    (name, kwargs, labels_id)
    for name, kwargs in [*(("triplet", {"mining": miner}) for miner in MINERS.names()),
                         ("npair", {}), ("circle", {}), ("supcon", {})]
    for labels_id in ("distinct", "one-class")
    if not (name == "supcon" and labels_id == "one-class")  # one class: every other sample is a positive
]


@pytest.mark.parametrize("name,kwargs,labels_id", NO_TUPLE_CASES)
def test_no_valid_tuple_gives_graph_keeping_zero(name, kwargs, labels_id):
    labels = torch.arange(7) if labels_id == "distinct" else torch.full((7,), 3)
    emb = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    loss = build_pair_loss(name, 5, 7, **kwargs)(emb, labels)
    assert loss.item() == 0.0 and loss.requires_grad
    (grad,) = torch.autograd.grad(loss, emb)
    assert torch.equal(grad, torch.zeros_like(emb))


@pytest.mark.parametrize(
    "name,kwargs,param",
    [
        ("triplet", {"margin": -0.1}, "margin"),
        ("triplet", {"mining": "hardest"}, "mining"),
        ("supcon", {"temperature": 0.0}, "temperature"),
        ("npair", {"temperature": -1.0}, "temperature"),
        ("circle", {"gamma": 0.0}, "gamma"),
        ("circle", {"m": 1.5}, "m"),
        ("center", {"lr": 0.0}, "lr"),
        ("triplet", {"margn": 0.2}, "margn"),
    ],
)
def test_build_pair_loss_rejects_bad_parameters(name, kwargs, param):
    with pytest.raises(ValueError, match=param):
        build_pair_loss(name, 8, 5, **kwargs)


def test_unknown_pair_loss_lists_valid_names():
    with pytest.raises(UnknownNameError, match="unknown pair loss 'arcface'; valid: triplet, center, npair, circle, supcon"):
        build_pair_loss("arcface", 8, 5)
    assert PAIR_LOSSES.names() == ["triplet", "center", "npair", "circle", "supcon"]
    assert isinstance(build_pair_loss("circle", 8, 5), CircleLoss)


def test_unknown_setting_names_the_valid_ones():
    with pytest.raises(ValueError) as info:
        build_pair_loss("triplet", 8, 5, margin=0.1, temperature=0.1)
    assert str(info.value) == "temperature: not a setting of the 'triplet' pair loss; valid: margin, mining"
    with pytest.raises(UnknownNameError, match="mining: unknown miner 'hardest'; valid: batch_hard, semi_hard, all"):
        build_pair_loss("triplet", 8, 5, mining="hardest")


def test_declared_settings_and_their_defaults():
    assert pair_loss_settings("triplet") == {"margin": 0.2, "mining": "batch_hard"}
    assert pair_loss_settings("circle") == {"m": 0.25, "gamma": 256.0, "detach_weights": True}
    assert pair_loss_settings("supcon") == {"temperature": 0.1}
    assert pair_loss_settings("npair") == {"temperature": 0.1}
    assert pair_loss_settings("center") == {"lr": None}
    with pytest.raises(UnknownNameError, match="valid: triplet"):
        pair_loss_settings("nope")


@pytest.mark.parametrize("name", PAIR_LOSSES.names())
def test_every_pair_loss_builds_from_its_declared_settings(name):
    """Defaults and a round trip of every declared setting through build_pair_loss; one step runs."""
    defaults = pair_loss_settings(name)
    loss_fn = build_pair_loss(name, 5, 3)
    assert isinstance(loss_fn, PairLoss) and isinstance(loss_fn, PAIR_LOSSES.get(name))
    assert dataclasses.asdict(loss_fn.settings) == defaults
    assert build_pair_loss(name, 5, 3, **defaults).settings == loss_fn.settings
    for key, value in defaults.items():
        assert f"{key}={value!r}" in repr(loss_fn)
    emb, _ = make_batch(6, 5, 3, seed=8)
    loss = loss_fn.double()(emb.requires_grad_(True), torch.tensor([0, 1, 0, 2, 1, 2]))
    assert loss.shape == () and torch.isfinite(loss) and loss.requires_grad


@pytest.mark.parametrize("miner", MINERS.names())
def test_every_miner_returns_valid_triplets(miner):
    emb, labels = make_batch(13, 7, 5, seed=6)
    a, p, n = MINERS.get(miner)(1 - cosine_similarity_matrix(emb), labels, 0.3)
    assert a.numel() > 0
    assert (labels[a] == labels[p]).all() and (a != p).all() and (labels[a] != labels[n]).all()
