"""Pair losses under torchrun see the whole global batch (trainer.model.FaceModel.cross_rank_pairs:
embeddings all-gathered with autograd), so negatives cross ranks and an identity whose K images are
split over ranks still forms its pairs: 2 processes give the 1-process loss and step."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from helpers import write_faces
from facefuse.trainer.checkpoint import load

TINY = ["--backbone", "resnet18", "--width", "0.25", "--embedding-dim", "16", "--image-size", "32",
        "--workers", "0", "--no-progress", "--threads", "1", "--val-fraction", "0", "--hflip", "0"]


def test_two_processes_give_the_one_process_pair_loss_and_step(tmp_path):
    data = write_faces(tmp_path / "faces", n_identities=3, n_images=2, size=32)
    # P x K = 3 x 2 over 2 ranks: 3 images each, so one identity's pair is split across the ranks
    args = ["--epochs", "1", "--loss", "triplet", "--sampler", "pk", "--pk", "3", "2", "--warmup-epochs", "0",
            "--lr", "0.05", "--optimizer", "sgd", "--set", "loss.pair_options.margin=0.5"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    train = [sys.executable, "-m", "facefuse.cli", "train", "--data", str(data), *TINY, *args]
    r = subprocess.run([*train, "--out", str(tmp_path / "one")], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        *train[1:], "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    losses = [json.loads((tmp_path / run / "metrics.jsonl").read_text().splitlines()[0])["train_loss"]
              for run in ("one", "two")]
    assert losses[0] > 0 and abs(losses[0] - losses[1]) < 1e-5 * max(1.0, losses[0])
    one, two = (load(tmp_path / run / "checkpoints" / "last.pt")["model"] for run in ("one", "two"))
    for name, t in one.items():
        torch.testing.assert_close(two[name], t, atol=2e-5, rtol=1e-4, msg=name)
