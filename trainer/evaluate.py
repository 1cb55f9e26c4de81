"""Validation during training: closed-set accuracy on held-out images and open-set verification
on a pairs file (embeddings compared by cosine similarity)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from facefuse.core.embed import embed_paths
from facefuse.core.settings import EmbedSettings
from facefuse.core.errors import FacefuseError, ParameterError
from facefuse.core.images import eval_transform
from facefuse.core.metrics import verification_metrics
from facefuse.core.pairs import read_pairs


@torch.no_grad()
def classification_accuracy(face_model, loader, device, autocast) -> float | None:
    """Top-1 accuracy of the classification head on held-out images (None without a head)."""
    if face_model.head is None or loader is None:
        return None
    face_model.eval()
    correct = total = 0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast():
            out = face_model(x, y)
        correct += int((out.preds == y).sum())
        total += y.numel()
    return correct / max(1, total)


def embed_training_model(embedder, paths: list, *, image_size: int, mean, std, device, autocast, batch_size: int = 128,
                 num_workers: int = 0, flip: bool = False) -> np.ndarray:
    """L2-normalised float32 embeddings (N x D) of the images at ``paths`` by a model in training
    (on ``device``, under ``autocast``), through the one :func:`facefuse.core.embed.embed_paths`."""
    embedder.eval()

    @torch.no_grad()
    def run(x):
        with autocast():
            return embedder.embed(x.to(device, non_blocking=True)).float()

    settings = EmbedSettings(flip=flip, batch_size=batch_size, workers=num_workers)
    emb, _ = embed_paths(run, paths, eval_transform(image_size, mean, std), dim=embedder.embedding_dim,
                         settings=settings)
    return emb


class PairsValidator:
    """Embeds each unique image of a pairs file once per evaluation and scores every pair."""

    def __init__(self, pairs_file: str, root: str | None, fold: int | None):
        pairs = read_pairs(pairs_file, root=root)
        if pairs.labels is None:
            raise ParameterError("data.val_pairs", pairs_file, "validation pairs need same/different labels")
        keep = np.ones(len(pairs), bool)
        if fold is not None:
            if pairs.folds is None or fold not in set(pairs.folds.tolist()):
                raise ParameterError("data.val_pairs_fold", fold, f"{pairs_file} has no such fold")
            keep = pairs.folds == fold
        self.paths_a = [p for p, k in zip(pairs.paths_a, keep) if k]
        self.paths_b = [p for p, k in zip(pairs.paths_b, keep) if k]
        self.labels = pairs.labels[keep].astype(np.int64)
        self.folds = None if pairs.folds is None else pairs.folds[keep]
        index: dict = {}
        for p in (*self.paths_a, *self.paths_b):
            index.setdefault(p, len(index))
        missing = [str(p) for p in index if not Path(p).is_file()]
        if missing:
            raise ParameterError("data.val_pairs", pairs_file, f"{len(missing)} images not found, e.g. {missing[0]} "
                                 "(set data.val_pairs_root=)")
        self.unique = list(index)
        self.ia = np.array([index[p] for p in self.paths_a])
        self.ib = np.array([index[p] for p in self.paths_b])

    def identities(self) -> set[str]:
        """Identity names (the images' folder names) that appear in the pairs."""
        return {Path(p).parent.name for p in self.unique}

    def scores(self, emb: np.ndarray) -> np.ndarray:
        return np.sum(emb[self.ia] * emb[self.ib], axis=1)

    def evaluate(self, embedder, **embed_kw) -> dict:
        emb = embed_training_model(embedder, self.unique, **embed_kw)
        s = self.scores(emb)
        if not np.all(np.isfinite(s)):
            return {"n_pairs": int(len(s)), "error": "non-finite scores"}
        return verification_metrics(s, self.labels, folds=self.folds)

