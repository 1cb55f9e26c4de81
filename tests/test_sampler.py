"""Batch samplers, checked by brute-force counting over the yielded batches (not the sampler's code)."""

import math
import random
from collections import Counter

import pytest

from facefuse.trainer.sampler import PKBatchSampler, RandomBatchSampler, _sample_seed


def make_labels(n_ids: int, seed: int = 0) -> list[int]:
    """n_ids identities with 1..9 images each (several with 1 and with few), indices shuffled."""
    sizes = [i * 7 % 9 + 1 for i in range(n_ids)]
    labels = [y for y, n in enumerate(sizes) for _ in range(n)]
    random.Random(seed).shuffle(labels)
    return labels


def epoch(sampler, e: int, skip: int = 0) -> list[list[tuple[int, int]]]:
    sampler.set_epoch(e, skip)
    return list(sampler)


def images_of(labels: list[int]) -> dict[int, set[int]]:
    out: dict[int, set[int]] = {}
    for i, y in enumerate(labels):
        out.setdefault(y, set()).add(i)
    return out


PK_CASES = [(n_ids, p, k) for n_ids in (10, 11, 13) for p, k in [(4, 4), (3, 2), (5, 3), (2, 6), (7, 5)]]


@pytest.mark.parametrize("n_ids,p,k", PK_CASES)
def test_pk_batches_have_p_distinct_identities_times_k(n_ids, p, k):
    labels = make_labels(n_ids)
    size = {y: len(idx) for y, idx in images_of(labels).items()}
    for e in range(3):
        for batch in epoch(PKBatchSampler(labels, p, k, seed=3), e):
            idx = [i for i, _ in batch]
            per_id = Counter(labels[i] for i in idx)
            assert len(idx) == p * k and len(per_id) == p and set(per_id.values()) == {k}
            for y in per_id:
                mine = [i for i in idx if labels[i] == y]
                assert size[y] >= 2
                if size[y] >= k:
                    assert len(set(mine)) == k  # no image twice
                else:  # every image, each floor/ceil(K/n) times
                    assert set(mine) == images_of(labels)[y]
                    assert set(Counter(mine).values()) <= {k // size[y], math.ceil(k / size[y])}


@pytest.mark.parametrize("n_ids,p,k", PK_CASES)
def test_pk_epoch_visits_every_usable_image(n_ids, p, k):
    labels = make_labels(n_ids)
    groups = images_of(labels)
    usable = {i for idx in groups.values() if len(idx) >= 2 for i in idx}
    singles = {i for idx in groups.values() if len(idx) == 1 for i in idx}
    assert singles and (k <= 2 or any(2 <= len(idx) < k for idx in groups.values()))
    s = PKBatchSampler(labels, p, k, seed=1)
    # the fewest batches that can show every usable image: slots for ceil(n/K) appearances per identity,
    # and each identity in at most one K-chunk per batch
    need = [math.ceil(len(idx) / k) for idx in groups.values() if len(idx) >= 2]
    assert len(s) == max(math.ceil(sum(need) / p), max(need))
    for e in range(3):
        seen = {i for batch in epoch(s, e) for i, _ in batch}
        assert seen == usable and not seen & singles


def test_pk_length_ignores_one_image_identities():
    labels = make_labels(13)
    groups = images_of(labels)
    kept = [y for y in labels if len(groups[y]) >= 2]
    with_singles = PKBatchSampler(labels + [100, 101, 102], 4, 3)
    assert len(PKBatchSampler(labels, 4, 3)) == len(PKBatchSampler(kept, 4, 3)) == len(with_singles)


def test_pk_issue_case_no_duplicates_over_reshuffles():
    """The reported case: 10 identities x 6 images, P = K = 4 (the old sampler broke 15 of 150 batches)."""
    labels = [i // 6 for i in range(60)]
    s = PKBatchSampler(labels, 4, 4, seed=0)
    batches = [b for e in range(50) for b in epoch(s, e)]
    assert len(batches) >= 150
    for batch in batches:
        idx = [i for i, _ in batch]
        assert len(set(idx)) == 16 and len({labels[i] for i in idx}) == 4


def test_pk_one_large_identity_sets_the_length():
    labels = [0] * 40 + [1, 1, 2, 2, 3, 3]  # identity 0 needs 10 chunks of 4: 10 batches
    s = PKBatchSampler(labels, 2, 4)
    batches = epoch(s, 0)
    assert len(s) == len(batches) == 10
    assert {i for b in batches for i, _ in b} == set(range(len(labels)))


@pytest.mark.parametrize("cls,args", [(PKBatchSampler, (3, 4)), (RandomBatchSampler, (12,))])
def test_determinism_and_epochs_differ(cls, args):
    labels = make_labels(11)
    a, b = cls(labels, *args, seed=5), cls(labels, *args, seed=5)
    assert epoch(a, 2) == epoch(b, 2)
    assert epoch(a, 2) != epoch(a, 3)
    assert epoch(a, 2) != epoch(cls(labels, *args, seed=6), 2)


@pytest.mark.parametrize("cls,args", [(PKBatchSampler, (3, 4)), (RandomBatchSampler, (12,))])
def test_seed_epoch_pairs_that_collided_now_differ(cls, args):
    labels = make_labels(13)
    old = epoch(cls(labels, *args, seed=0), 7919)  # seed*7919+epoch == 7919 for both
    new = epoch(cls(labels, *args, seed=1), 0)
    assert [[i for i, _ in b] for b in old] != [[i for i, _ in b] for b in new]
    assert {s for b in old for _, s in b}.isdisjoint({s for b in new for _, s in b})


def test_sample_seeds_collision_free():
    # collided under ((seed*1_000_003 + epoch)*10_000_019 + position) % 2**62
    assert _sample_seed(0, 1_000_003, 0) != _sample_seed(1, 0, 0)
    assert _sample_seed(0, 0, 10_000_019) != _sample_seed(0, 1, 0)
    grid = {_sample_seed(s, e, pos) for s in range(4) for e in range(4) for pos in range(200)}
    assert len(grid) == 4 * 4 * 200 and all(0 <= x < 2**63 for x in grid)


@pytest.mark.parametrize("cls,args", [(PKBatchSampler, (4, 3)), (PKBatchSampler, (3, 2)), (RandomBatchSampler, (8,))])
def test_ranks_partition_global_batch_and_skip_continues(cls, args):
    labels = make_labels(13)
    one = cls(labels, *args, seed=1)
    ranks = [cls(labels, *args, seed=1, rank=r, world_size=2) for r in range(2)]
    batches = epoch(one, 2)
    shares = [epoch(r, 2) for r in ranks]
    assert len(batches) == len(one) == len(ranks[0]) and len(batches) >= 3
    for b, (r0, r1) in enumerate(zip(*shares)):
        assert len(r0) == len(r1) and r0 + r1 == batches[b]
    assert epoch(one, 2, skip=2) == batches[2:] and len(one) == len(batches) - 2
    assert epoch(ranks[1], 2, skip=2) == shares[1][2:]


def test_random_sampler_ranks_partition_global_batch():
    labels = list(range(50))
    one = RandomBatchSampler(labels, 8, seed=1)
    ranks = [RandomBatchSampler(labels, 8, seed=1, rank=r, world_size=2) for r in range(2)]
    for s in (one, *ranks):
        s.set_epoch(2)
    batches = list(one)
    assert len(batches) == 6
    for b, (r0, r1) in enumerate(zip(*ranks)):
        assert r0 + r1 == batches[b]
    one.set_epoch(2, skip_batches=4)
    assert list(one) == batches[4:]
    one.set_epoch(3)
    assert list(one) != batches


def test_pk_sampler():
    labels = [i // 5 for i in range(60)]  # 12 identities x 5
    s = PKBatchSampler(labels, 4, 3, seed=0)
    s.set_epoch(0)
    for batch in s:
        ids = [labels[i] for i, _ in batch]
        assert len(ids) == 12 and len(set(ids)) == 4 and all(ids.count(y) == 3 for y in set(ids))
        assert len({i for i, _ in batch}) == 12
    with pytest.raises(ValueError, match="needs >= 20 identities"):
        PKBatchSampler(labels, 20, 2)


def test_pk_errors_name_the_option():
    labels = [0, 0, 1, 1, 2, 2] + list(range(3, 20))  # 3 usable identities, 17 with one image
    with pytest.raises(ValueError, match=r"data.pk_identities=4: the P x K sampler needs >= 4 identities with "
                                         r"2\+ images, found 3"):
        PKBatchSampler(labels, 4, 2)
    with pytest.raises(ValueError, match="data.pk_identities=3: P x K = 3 x 3 = 9 must be divisible by the 2 processes"):
        PKBatchSampler(labels, 3, 3, world_size=2)
    with pytest.raises(ValueError, match="optim.batch_size=9: must be divisible"):
        RandomBatchSampler(labels, 9, world_size=2)
