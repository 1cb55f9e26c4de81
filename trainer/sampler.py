"""Deterministic, distributed-aware batch samplers.

Each yields, per batch, this rank's share of a *global* batch as ``(index, sample_seed)`` pairs.
The order depends only on (seed, epoch), so a resumed run skips the batches already seen and sees
exactly the same data and augmentations (each sample's transform is seeded by ``sample_seed``).

Seeds: every random stream is seeded by ``_mix(purpose, seed, epoch[, position])``, a 63-bit blake2b
hash of the tuple's repr. The repr is injective, so distinct tuples differ before hashing and can only
meet by a hash collision (about 2**-63 per pair); the old ``seed*7919 + epoch`` gave (0, 7919) == (1, 0).

P x K epochs (``PKBatchSampler``). Usable identities have >= 2 images; one-image identities are
never drawn and do not count. Identity y with n_y images needs a_y = ceil(n_y / K) appearances to show
every image once, so an epoch has B = max(ceil(sum a_y / P), max a_y) batches, the fewest that allow it.
The B*P slots beyond sum a_y go one at a time to identities in a shuffled order (none above B). Batches
are drawn with no identity twice (see ``_schedule``), then put in random order. Each appearance of y
takes its next K images: for n_y >= K from a walk over shuffled permutations (K distinct images, every
image once per cycle); for n_y < K one shuffled permutation tiled to K (each image floor/ceil(K/n_y) times).
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch.utils.data import Sampler

from facefuse.core.errors import ParameterError


def _mix(purpose: str, *values: int) -> int:
    """63-bit seed from ``(purpose, *values)``: blake2b of the tuple's repr (injective text, so no
    arithmetic collisions such as seed*7919+epoch had)."""
    text = repr((purpose, *(int(v) for v in values)))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def _sample_seed(seed: int, epoch: int, position: int) -> int:
    """Augmentation seed of the sample at ``position`` (in the epoch's global order) of ``epoch``."""
    return _mix("augment", seed, epoch, position)


class _EpochBatches(Sampler):
    """Common part: global batches of one epoch from ``_global_batches``, split across ranks."""

    def __init__(self, labels: list[int], batch_size: int, *, seed: int = 0, rank: int = 0, world_size: int = 1,
                 param: str = "optim.batch_size"):
        if batch_size % world_size:
            raise ParameterError(param, batch_size, f"must be divisible by the {world_size} processes")
        self.labels = labels
        self.batch_size = batch_size
        self.local = batch_size // world_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip = epoch, skip_batches

    def __len__(self) -> int:
        return self._num_batches() - self.skip

    def _generator(self, purpose: str) -> torch.Generator:
        return torch.Generator().manual_seed(_mix(purpose, self.seed, self.epoch))

    def __iter__(self):
        batches = self._global_batches()
        lo = self.rank * self.local
        for b in range(self.skip, len(batches)):
            yield [(i, _sample_seed(self.seed, self.epoch, b * self.batch_size + lo + j))
                   for j, i in enumerate(batches[b][lo:lo + self.local])]


class RandomBatchSampler(_EpochBatches):
    """Shuffled global batches; the last incomplete batch is dropped (equal batches on all ranks)."""

    def _num_batches(self) -> int:
        return max(1, len(self.labels) // self.batch_size)

    def _global_batches(self) -> list[list[int]]:
        perm = torch.randperm(len(self.labels), generator=self._generator("random-order")).tolist()
        if len(perm) < self.batch_size:  # tiny data sets: repeat to fill one batch
            perm = (perm * (self.batch_size // max(1, len(perm)) + 1))[: self.batch_size]
        return [perm[b * self.batch_size:(b + 1) * self.batch_size] for b in range(self._num_batches())]


class PKBatchSampler(_EpochBatches):
    """P distinct identities x K images per global batch (for pair losses); design in the module
    docstring. Identities with one image are left out; fewer than P usable identities is an error."""

    def __init__(self, labels: list[int], p: int, k: int, **kw):
        if p < 1 or k < 1:
            raise ParameterError("data.pk_identities", p, f"P and K (data.pk_images={k}) must be >= 1")
        if p * k % kw.get("world_size", 1):
            raise ParameterError("data.pk_identities", p, f"P x K = {p} x {k} = {p * k} must be divisible by "
                                 f"the {kw['world_size']} processes")
        super().__init__(labels, p * k, **kw)
        self.p, self.k = p, k
        by_label: dict[int, list[int]] = {}
        for i, y in enumerate(labels):
            by_label.setdefault(y, []).append(i)
        self.pools = [idx for idx in by_label.values() if len(idx) >= 2]
        if len(self.pools) < p:
            raise ParameterError("data.pk_identities", p, f"the P x K sampler needs >= {p} identities with 2+ "
                                 f"images, found {len(self.pools)}")
        self.needed = torch.tensor([math.ceil(len(pool) / k) for pool in self.pools])

    def _num_batches(self) -> int:
        """B = max(ceil(sum_y a_y / P), max_y a_y) with a_y = ceil(n_y / K): enough slots for every
        image, and enough batches for the largest identity to appear at most once per batch."""
        return max(math.ceil(int(self.needed.sum()) / self.p), int(self.needed.max()))

    def _global_batches(self) -> list[list[int]]:
        g = self._generator("pk-order")
        n = self._num_batches()
        counts = _spread_extras(self.needed, n * self.p - int(self.needed.sum()), n, g)
        schedule = _schedule(counts, self.p, g)
        schedule = [schedule[b] for b in torch.randperm(n, generator=g).tolist()]
        chunks = [_image_chunks(pool, int(c), self.k, g) for pool, c in zip(self.pools, counts)]
        return [[i for y in ids for i in chunks[y].pop()] for ids in schedule]


def _spread_extras(needed: torch.Tensor, extra: int, cap: int, g: torch.Generator) -> torch.Tensor:
    """Appearances per identity: ``needed`` plus ``extra`` more, one at a time to identities in a
    shuffled order, passing over any already at ``cap`` (= batches, since one appearance per batch)."""
    counts = needed.clone()
    order = torch.randperm(len(counts), generator=g)
    while extra > 0:
        room = order[counts[order] < cap][:extra]
        if not len(room):
            raise AssertionError("more P x K slots than identities can fill")  # excluded by B >= sum/P
        counts[room] += 1
        extra -= len(room)
    return counts


def _schedule(counts: torch.Tensor, p: int, g: torch.Generator) -> list[list[int]]:
    """Split identity appearances ``counts`` (sum = P*B, each <= B) into B batches of P distinct ids.

    With R batches left, remaining r_y <= R and sum r_y = P*R hold. Identities with r_y = R are forced
    into this batch (at most P of them); the rest are drawn without replacement with probability
    proportional to r_y. Afterwards every r_y <= R-1 and the sum is P*(R-1), so the invariant holds.
    (For R > 1 the unforced positive r_y, each <= R-1, sum to (P-|forced|)*R, so there are enough.)"""
    left = counts.clone()
    n = int(counts.sum()) // p
    batches = []
    for rest in range(n, 0, -1):
        forced = (left == rest).nonzero().flatten()
        weights = left.double()
        weights[forced] = 0
        free = p - len(forced)
        drawn = torch.multinomial(weights, free, generator=g) if free else forced[:0]
        chosen = torch.cat([forced, drawn])[torch.randperm(p, generator=g)]
        left[chosen] -= 1
        batches.append(chosen.tolist())
    return batches


def _image_chunks(pool: list[int], count: int, k: int, g: torch.Generator) -> list[list[int]]:
    """``count`` chunks of K images of one identity, as a stack (``pop()`` gives the first chunk)."""
    if len(pool) < k:
        chunks = [_tiled(pool, k, g) for _ in range(count)]
    else:
        chunks = _walk(pool, count, k, g)
    return chunks[::-1]


def _tiled(pool: list[int], k: int, g: torch.Generator) -> list[int]:
    """n < K images: one shuffled permutation repeated to length K (each image floor/ceil(K/n) times)."""
    perm = [pool[j] for j in torch.randperm(len(pool), generator=g).tolist()]
    return (perm * math.ceil(k / len(perm)))[:k]


def _walk(pool: list[int], count: int, k: int, g: torch.Generator) -> list[list[int]]:
    """n >= K images: chunks of K distinct images walking shuffled permutations (cycles). When a cycle
    has r < K left, the chunk takes those r and the first K-r images of a new cycle that are not among
    them; the new cycle's other images (the r included) follow. Every image appears once per cycle,
    so the first ceil(n/K) chunks show all n images."""
    chunks, queue = [], []
    for _ in range(count):
        if len(queue) < k:
            fresh = [pool[j] for j in torch.randperm(len(pool), generator=g).tolist()]
            held = set(queue)
            take = [i for i in fresh if i not in held][: k - len(queue)]
            taken = set(take)
            chunks.append(queue + take)
            queue = [i for i in fresh if i not in taken]
        else:
            chunks.append(queue[:k])
            queue = queue[k:]
    return chunks
