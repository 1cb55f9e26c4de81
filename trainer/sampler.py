"""Deterministic, distributed-aware batch samplers.

Each yields, per batch, this rank's share of a *global* batch as ``(index, sample_seed)`` pairs.
The order depends only on (seed, epoch), so a resumed run skips the batches already seen and sees
exactly the same data and augmentations (each sample's transform is seeded by ``sample_seed``).
"""

from __future__ import annotations

import torch
from torch.utils.data import Sampler


def _sample_seed(seed: int, epoch: int, position: int) -> int:
    return ((seed * 1_000_003 + epoch) * 10_000_019 + position) % (2**62)


class _EpochBatches(Sampler):
    def __init__(self, labels: list[int], batch_size: int, *, seed: int = 0, rank: int = 0, world_size: int = 1):
        if batch_size % world_size:
            raise ValueError(f"--batch-size {batch_size} must be divisible by the {world_size} processes")
        self.labels = labels
        self.batch_size = batch_size
        self.local = batch_size // world_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip = epoch, skip_batches

    def __len__(self) -> int:
        return max(1, len(self.labels) // self.batch_size) - self.skip

    def _generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 7919 + self.epoch)

    def __iter__(self):
        n = max(1, len(self.labels) // self.batch_size)
        batches = self._global_batches(n)
        for b in range(self.skip, n):
            glob = batches[b]
            lo = self.rank * self.local
            yield [(i, _sample_seed(self.seed, self.epoch, b * self.batch_size + lo + j))
                   for j, i in enumerate(glob[lo:lo + self.local])]


class RandomBatchSampler(_EpochBatches):
    """Shuffled global batches; the last incomplete batch is dropped (equal batches on all ranks)."""

    def _global_batches(self, n: int) -> list[list[int]]:
        perm = torch.randperm(len(self.labels), generator=self._generator()).tolist()
        if len(perm) < self.batch_size:  # tiny data sets: repeat to fill one batch
            perm = (perm * (self.batch_size // max(1, len(perm)) + 1))[: self.batch_size]
        return [perm[b * self.batch_size:(b + 1) * self.batch_size] for b in range(n)]


class PKBatchSampler(_EpochBatches):
    """P identities x K images per global batch (for pair losses). Identities are drawn without
    replacement until exhausted, then reshuffled; an identity with fewer than K images repeats some."""

    def __init__(self, labels: list[int], p: int, k: int, **kw):
        super().__init__(labels, p * k, **kw)
        self.p, self.k = p, k
        by_label: dict[int, list[int]] = {}
        for i, y in enumerate(labels):
            by_label.setdefault(y, []).append(i)
        self.by_label = {y: idx for y, idx in by_label.items() if len(idx) >= 2} or by_label
        if len(self.by_label) < p:
            raise ValueError(f"P x K sampler needs >= {p} identities with 2+ images, found {len(self.by_label)}")

    def _global_batches(self, n: int) -> list[list[int]]:
        g = self._generator()
        ids = list(self.by_label)
        order: list[int] = []
        batches = []
        for _ in range(n):
            if len(order) < self.p:
                order += [ids[i] for i in torch.randperm(len(ids), generator=g).tolist()]
            chosen, order = order[: self.p], order[self.p:]
            batch = []
            for y in chosen:
                pool = self.by_label[y]
                if len(pool) >= self.k:
                    pick = torch.randperm(len(pool), generator=g)[: self.k].tolist()
                else:
                    pick = torch.randint(len(pool), (self.k,), generator=g).tolist()
                batch += [pool[j] for j in pick]
            batches.append(batch)
        return batches
