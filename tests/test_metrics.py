"""core.metrics against scikit-learn and plain numpy brute force, on random and tied scores."""

import numpy as np
import pytest
from scipy.interpolate import interp1d
from scipy.optimize import brentq
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from facefuse.core import metrics
from facefuse.core.errors import FacefuseError


def _data(n, kind, seed):
    rng = np.random.default_rng(seed)
    y = rng.random(n) < 0.4
    y[:2] = [True, False]
    if kind == "random":
        s = rng.normal(size=n) + 1.3 * y
    elif kind == "tied":  # few distinct values: many ties inside and across classes
        s = np.round(rng.normal(size=n) + 1.0 * y, 1)
    else:  # "cosine": bounded scores like a real model's
        s = np.clip(rng.normal(0.1, 0.2, n) + 0.45 * y, -1, 1).astype(np.float32)
    return s, y.astype(np.int8)


CASES = [(n, kind, seed) for n, kind, seed in
         [(2, "random", 0), (7, "random", 1), (97, "random", 2), (1001, "random", 3),
          (13, "tied", 4), (257, "tied", 5), (3000, "tied", 6), (600, "cosine", 7), (6000, "cosine", 8)]]


@pytest.mark.parametrize("n,kind,seed", CASES)
def test_roc_curve_matches_sklearn(n, kind, seed):
    s, y = _data(n, kind, seed)
    far, tar, th = metrics.roc_curve(s, y)
    sk_far, sk_tar, sk_th = sk_roc_curve(y, s.astype(np.float64), drop_intermediate=False)
    np.testing.assert_allclose(far, sk_far, rtol=0, atol=1e-12)
    np.testing.assert_allclose(tar, sk_tar, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(th[1:], sk_th[1:])
    assert th[0] == np.inf


@pytest.mark.parametrize("n,kind,seed", CASES)
def test_roc_auc_matches_sklearn_and_pair_counting(n, kind, seed):
    s, y = _data(n, kind, seed)
    auc = metrics.roc_auc(s, y)
    assert auc == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    pos, neg = s[y == 1].astype(np.float64), s[y == 0].astype(np.float64)
    if pos.size * neg.size <= 4_000_000:  # Mann-Whitney brute force over all (same, different) pairs
        diff = pos[:, None] - neg[None, :]
        brute = (np.sum(diff > 0) + 0.5 * np.sum(diff == 0)) / diff.size
        assert auc == pytest.approx(brute, abs=1e-12)


@pytest.mark.parametrize("n,kind,seed", CASES)
def test_eer_matches_interpolated_root(n, kind, seed):
    s, y = _data(n, kind, seed)
    fpr, tpr, _ = sk_roc_curve(y, s, drop_intermediate=False)
    # the classic formulation: the root of 1 - x - TAR(x) on the ROC polyline
    f = interp1d(fpr, tpr)
    try:
        ref = brentq(lambda x: 1.0 - x - f(x), 0.0, 1.0)
    except ValueError:
        pytest.skip("vertical ROC segment at the crossing: the root of a step is undefined")
    got = metrics.eer(s, y)
    # at a vertical ROC segment (ties) the reference x is unique, so both agree
    assert got == pytest.approx(ref, abs=1e-9)


def test_eer_perfect_and_inverted():
    s = np.array([0.9, 0.8, 0.2, 0.1])
    assert metrics.eer(s, [1, 1, 0, 0]) == pytest.approx(0.0)
    assert metrics.eer(s, [0, 0, 1, 1]) == pytest.approx(1.0)


@pytest.mark.parametrize("n,kind,seed", CASES)
@pytest.mark.parametrize("target", [1e-3, 1e-2, 0.1, 0.5])
def test_tar_at_far_brute_force(n, kind, seed, target):
    s, y = _data(n, kind, seed)
    s64 = s.astype(np.float64)
    # brute force operating points: one threshold per candidate, counting accepted pairs directly
    cands = np.r_[np.inf, np.unique(s64)[::-1]]
    far = np.array([np.mean(s64[y == 0] >= t) for t in cands])
    tar = np.array([np.mean(s64[y == 1] >= t) for t in cands])
    lo = far <= target  # best point not above the target, and the next point beyond it
    k = np.flatnonzero(lo)[-1]
    tar_lo = tar[lo].max()
    if far[k] == target or k == far.size - 1:
        ref = tar_lo
    else:
        hi = np.flatnonzero(far > target)[0]
        w = (target - far[k]) / (far[hi] - far[k])
        ref = tar_lo + w * (tar[hi] - tar_lo)
    got = metrics.tar_at_far(s, y, target)
    assert got == pytest.approx(ref, abs=1e-12)
    # the conservative value (no interpolation) is a lower bound
    assert got >= tar_lo - 1e-12


@pytest.mark.parametrize("n,kind,seed", CASES)
def test_best_threshold_brute_force(n, kind, seed):
    s, y = _data(n, kind, seed)
    s64 = s.astype(np.float64)
    u = np.unique(s64)
    cands = np.r_[u, (u[1:] + u[:-1]) / 2, u[-1] + 1.0]
    brute = max(np.mean((s64 >= t) == y.astype(bool)) for t in cands)
    th, acc = metrics.best_threshold(s, y)
    assert acc == pytest.approx(brute, abs=1e-12)
    assert metrics.accuracy(s, y, th) == pytest.approx(acc, abs=1e-12)


def test_best_threshold_sits_between_classes():
    s = np.array([0.1, 0.2, 0.3, 0.7, 0.8])
    th, acc = metrics.best_threshold(s, [0, 0, 0, 1, 1])
    assert acc == 1.0 and th == pytest.approx(0.5)


@pytest.mark.parametrize("n,kind,seed", [c for c in CASES if c[0] >= 200])
@pytest.mark.parametrize("n_folds", [2, 3, 10])
def test_kfold_brute_force(n, kind, seed, n_folds):
    s, y = _data(n, kind, seed)
    folds = metrics.split_folds(y, n_folds)
    mean, std, accs, ths = metrics.kfold_accuracy(s, y, folds)
    ref = []
    for k in range(n_folds):
        tr, te = folds != k, folds == k
        u = np.unique(s[tr].astype(np.float64))
        cands = np.r_[u[-1] + 1, (u[1:] + u[:-1]) / 2, u[0]]
        train_acc = np.array([np.mean((s[tr] >= t) == y[tr].astype(bool)) for t in cands])
        best = train_acc.max()
        # every threshold reaching the best training accuracy; the chosen one must be among them
        assert np.mean((s[tr] >= ths[k]) == y[tr].astype(bool)) == pytest.approx(best, abs=1e-12)
        ref.append(np.mean((s[te] >= ths[k]) == y[te].astype(bool)))
    np.testing.assert_allclose(accs, ref, atol=1e-12)
    assert mean == pytest.approx(np.mean(ref), abs=1e-12)
    assert std == pytest.approx(np.std(ref), abs=1e-12)


@pytest.mark.parametrize("n_pos,n_neg,k", [(300, 300, 10), (1100, 1100, 10), (7, 11, 3), (13, 5, 10)])
def test_split_folds_balanced_and_contiguous(n_pos, n_neg, k):
    y = np.r_[np.ones(n_pos), np.zeros(n_neg)].astype(np.int8)
    f = metrics.split_folds(y, k)
    for cls, n in ((1, n_pos), (0, n_neg)):
        counts = np.bincount(f[y == cls], minlength=k)
        assert counts.sum() == n and counts.max() - counts.min() <= 1
        assert np.all(np.diff(f[y == cls]) >= 0)  # contiguous parts in file order


def test_verification_metrics_keys_and_values():
    s, y = _data(600, "cosine", 9)
    folds = np.arange(600) // 60
    m = metrics.verification_metrics(s, y, folds)
    assert m["roc_auc"] == pytest.approx(roc_auc_score(y, s))
    assert m["eer"] == pytest.approx(metrics.eer(s, y))
    assert m["tar_at_far_1e-2"] == pytest.approx(metrics.tar_at_far(s, y, 1e-2))
    assert m["tar_at_far_1e-3"] == pytest.approx(metrics.tar_at_far(s, y, 1e-3))
    assert m["kfold_n"] == 10
    assert m["kfold_accuracy"] == pytest.approx(metrics.kfold_accuracy(s, y, folds)[0])
    one = metrics.verification_metrics(s, y, np.zeros(600, dtype=int))
    assert one["kfold_n"] == 10
    assert one["kfold_accuracy"] == pytest.approx(
        metrics.kfold_accuracy(s, y, metrics.split_folds(y, 10))[0])
    assert "kfold_accuracy" not in metrics.verification_metrics(s, y)


@pytest.mark.parametrize("labels", [[1, 1, 1], [0, 0, 0]])
def test_one_class_is_an_error(labels):
    with pytest.raises(FacefuseError, match="both"):
        metrics.verification_metrics([0.1, 0.2, 0.3], labels)


def test_nan_scores_are_an_error():
    with pytest.raises(FacefuseError, match="NaN"):
        metrics.roc_auc([0.1, np.nan], [1, 0])
