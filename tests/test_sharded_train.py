"""Training with the sharded head through the CLI under torchrun (gloo, CPU): 2 and 3 processes take
the same step (the centres' init and the step do not depend on the world size), exact resume after
kill -9 with per-rank shard files, and the bad inputs (one-line errors, nothing overwritten)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch

from helpers import kill_at_step, run_cli, write_faces
from facefuse.trainer.checkpoint import head_shard_path, load

TINY = ["--backbone", "resnet18", "--width", "0.25", "--embedding-dim", "16", "--image-size", "32",
        "--workers", "0", "--no-progress", "--threads", "1", "--val-fraction", "0", "--hflip", "0"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _torchrun(n, data, out, *extra):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), "-m",
            "facefuse.cli", "train", "--data", str(data), "--out", str(out), *TINY, *extra]


def _head(run, world, step):
    return torch.cat([load(head_shard_path(run / "checkpoints", r, world, step))["weight"] for r in range(world)])


def test_two_and_three_processes_take_the_same_step(tmp_path):
    data = write_faces(tmp_path / "faces", n_identities=7, n_images=2, size=32)  # 7 classes: 4+3, 3+2+2
    args = ["--epochs", "1", "--batch-size", "6", "--warmup-epochs", "0", "--lr", "0.05", "--optimizer", "sgd",
            "--loss", "arcface", "--label-smoothing", "0.1", "--head-parallel", "--grad-clip", "0.5"]
    runs = {}
    for n in (2, 3):
        r = subprocess.run(_torchrun(n, data, tmp_path / f"n{n}", *args), env=ENV, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-3000:]
        runs[n] = load(tmp_path / f"n{n}" / "checkpoints" / "last.pt")
        assert runs[n]["head_parallel"] == {"world_size": n, "step": 2, "num_classes": 7}
        assert "head.weight" not in runs[n]["model"]
    for name, t in runs[2]["model"].items():
        torch.testing.assert_close(runs[3]["model"][name], t, atol=2e-5, rtol=1e-4, msg=name)
    h2, h3 = _head(tmp_path / "n2", 2, 2), _head(tmp_path / "n3", 3, 2)
    assert h2.shape == (7, 16)
    torch.testing.assert_close(h3, h2, atol=2e-6, rtol=1e-4)
    from facefuse.trainer.sharded_head import init_centres
    assert not torch.allclose(h2, init_centres(0, 7, 16, 0))  # the step moved the centres


def test_exact_resume_after_kill(tmp_path):
    data = write_faces(tmp_path / "faces", n_identities=5, n_images=6, size=32)
    args = ["--epochs", "3", "--batch-size", "4", "--loss", "cosface", "--head-parallel", "--sample-rate", "0.5",
            "--ema-decay", "0.9", "--dropout", "0.2", "--lr", "3e-3"]
    ref = tmp_path / "ref"
    r = subprocess.run(_torchrun(2, data, ref, *args), env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]

    run = tmp_path / "run"
    proc = subprocess.Popen(_torchrun(2, data, run, *args, "--checkpoint-minutes", "0.0001"), env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    last = run / "checkpoints" / "last.pt"
    kill_at_step(proc, last, 9, lambda p: os.killpg(p.pid, signal.SIGKILL))  # kill -9 the whole group inside epoch 2
    state = load(last)["state"]
    assert 7 < state["step"] < 14
    r = subprocess.run(_torchrun(2, data, run, "--resume"), env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]

    a, b = load(ref / "checkpoints" / "last.pt"), load(last)
    assert a["state"]["step"] == b["state"]["step"] == 21
    for part in ("model", "ema_full"):
        for name, t in a[part].items():
            assert torch.equal(t, b[part][name]), name
    for rank in range(2):
        sa, sb = (load(head_shard_path(x / "checkpoints", rank, 2, 21)) for x in (ref, run))
        assert torch.equal(sa["weight"], sb["weight"]) and torch.equal(sa["ema"], sb["ema"])
        for k, t in sa["optimizer"].items():
            assert torch.equal(t, sb["optimizer"][k]), k
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "head-rank0-of-2-step000000021.pt", "head-rank1-of-2-step000000021.pt", "last.pt"]

    # another world size: a one-line error, nothing written
    before = {p.name: p.stat().st_mtime_ns for p in (run / "checkpoints").iterdir()}
    res = run_cli("train", "--data", data, "--out", run, "--resume", *TINY)
    assert res.exit_code == 2, res.output
    assert "--resume: the run's sharded head was saved by 2 processes" in res.output
    assert len(res.output.strip().splitlines()) == 1
    assert before == {p.name: p.stat().st_mtime_ns for p in (run / "checkpoints").iterdir()}


@pytest.mark.parametrize("args,message", [
    (["--sample-rate", "0"], "--sample-rate: must be in (0, 1], got 0.0"),
    (["--sample-rate", "1.5", "--head-parallel"], "--sample-rate: must be in (0, 1], got 1.5"),
    (["--sample-rate", "0.5"], "--sample-rate: class sampling needs --head-parallel"),
    (["--head-parallel", "--loss", "triplet", "--sampler", "pk", "--pk", "2", "2"],
     "--head-parallel: --loss triplet is a pair loss"),
    (["--head-parallel", "--loss", "softmax"], "--head-parallel: the sharded head needs a margin head"),
    (["--head-parallel", "--loss", "arcface"], "--head-parallel: needs 2+ processes"),
])
def test_bad_options(faces, tmp_path, args, message):
    r = run_cli("train", "--data", faces, "--out", tmp_path / "run", "--epochs", 1, *TINY, *args)
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
