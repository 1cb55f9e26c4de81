"""End-to-end training through the CLI: a real (tiny) run, bad inputs, exact resume after kill -9,
and a two-process DDP step equal to the one-process step."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import kill_at_step, run_cli, write_faces
from facefuse.trainer.checkpoint import load, load_embedding_model

REPO = Path(__file__).resolve().parent.parent
TINY = ["--backbone", "resnet18", "--width", "0.25", "--embedding-dim", "16", "--image-size", "32",
        "--workers", "0", "--no-progress", "--threads", "1"]




def test_train_end_to_end(faces, tmp_path):
    out = tmp_path / "run"
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("\n".join([
        "person_00/img_00.jpg person_00/img_01.jpg 1", "person_01/img_02.jpg person_01/img_03.jpg 1",
        "person_02/img_00.jpg person_03/img_00.jpg 0", "person_00/img_04.jpg person_02/img_05.jpg 0"]) + "\n")
    r = run_cli("train", "--data", faces, "--out", out, "--epochs", 3, "--batch-size", 8, "--loss", "arcface",
                "--val-pairs", pairs, "--val-pairs-root", faces, "--val-fraction", 0.2, "--lr", 3e-3, *TINY)
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs_done"] == 3 and summary["identities"] == 4
    assert 0 <= summary["val_accuracy"] <= 1 and 0 <= summary["pairs_roc_auc"] <= 1
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert records[-1]["train_loss"] < records[0]["train_loss"]  # it learns
    assert (out / "config.yaml").is_file() and (out / "checkpoints" / "last.pt").is_file()
    model, meta = load_embedding_model(out)
    assert meta.embedding_dim == 16 and meta.image_size == 32 and meta.num_classes == 4
    assert model.embed(torch.randn(2, 3, 32, 32)).shape == (2, 16)
    # checkpoints load with weights_only=True (no arbitrary unpickling)
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=True)["format"] == "facefuse"


def test_config_file_then_options(faces, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("optim:\n  epochs: 1\n  batch_size: 6\nloss:\n  name: cosface\n  scale: 16\n")
    out = tmp_path / "run"
    r = run_cli("train", "--config", cfg, "--data", faces, "--out", out, "--batch-size", 4, *TINY)
    assert r.exit_code == 0, r.output
    import yaml
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["optim"]["batch_size"] == 4 and saved["optim"]["epochs"] == 1  # option beats file
    assert saved["loss"]["name"] == "cosface" and saved["loss"]["scale"] == 16


@pytest.mark.parametrize("args,message", [
    (["--backbone", "vgg"], "--backbone: unknown 'vgg'; valid: convnext_t"),
    (["--loss", "magface"], "--loss: unknown 'magface'; valid: softmax"),
    (["--lr", "-1"], "--lr: must be a positive number"),
    (["--epochs", "0"], "--epochs: must be >= 1"),
    (["--label-smoothing", "1.5"], "--label-smoothing: must be in [0, 1)"),
    (["--image-size", "50"], "--image-size: must be a multiple of 16"),
    (["--kernels", "cuda"], "--kernels: unknown 'cuda'"),
    (["--sampler", "pk", "--pk", "9", "2"], "P x K sampler needs >= 9 identities"),
])
def test_bad_options(faces, tmp_path, args, message):
    r = run_cli("train", "--data", faces, "--out", tmp_path / "run", "--epochs", 1, *TINY, *args)
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1


def test_bad_data(tmp_path, faces):
    r = run_cli("train", "--data", tmp_path / "missing", "--out", tmp_path / "run", *TINY)
    assert r.exit_code == 2 and "no such folder" in r.output
    (faces / "person_01" / "img_03.jpg").write_bytes(b"\xff\xd8\xff broken")
    r = run_cli("train", "--data", faces, "--out", tmp_path / "run", "--epochs", 1, *TINY)
    assert r.exit_code == 2 and "img_03.jpg" in r.output and "--skip-bad" in r.output
    r = run_cli("train", "--data", faces, "--out", tmp_path / "run", "--epochs", 1, "--skip-bad",
                "--batch-size", 4, *TINY)
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["skipped_bad"] == 1
    r = run_cli("train", "--data", faces, "--out", tmp_path / "run", "--epochs", 1, "--skip-bad", *TINY)
    assert r.exit_code == 2 and "already holds a run; pass --resume" in r.output
    r = run_cli("train", "--data", faces, "--out", tmp_path / "other", "--resume", *TINY)
    assert r.exit_code == 2 and "nothing to resume" in r.output


def test_nan_loss_is_reported(faces, tmp_path):
    r = run_cli("train", "--data", faces, "--out", tmp_path / "run", "--epochs", 2, "--batch-size", 4,
                "--lr", "1e30", "--warmup-epochs", 0, "--grad-clip", 0, *TINY)
    assert r.exit_code == 2, r.output
    assert "loss became" in r.output and "lower --lr" in r.output


def _train_cmd(data, out, *extra):
    return [sys.executable, "-m", "facefuse.cli", "train", "--data", str(data), "--out", str(out), *TINY, *extra]


def test_exact_resume_after_kill(tmp_path):
    data = write_faces(tmp_path / "faces", n_identities=4, n_images=8, size=32)
    args = ["--epochs", "2", "--batch-size", "4", "--mixup", "0.3", "--ema-decay", "0.9", "--dropout", "0.2",
            "--val-fraction", "0", "--lr", "3e-3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref = tmp_path / "ref"
    subprocess.run(_train_cmd(data, ref, *args), check=True, env=env, capture_output=True)

    run = tmp_path / "run"
    proc = subprocess.Popen(_train_cmd(data, run, *args, "--checkpoint-minutes", "0.0001"), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = run / "checkpoints" / "last.pt"
    kill_at_step(proc, last, 11, lambda p: os.kill(p.pid, signal.SIGKILL))  # kill -9 in the middle of epoch 2
    state = load(last)["state"]
    assert 8 < state["step"] < 16  # killed inside epoch 2
    subprocess.run(_train_cmd(data, run, "--resume"), check=True, env=env, capture_output=True)

    a, b = load(ref / "checkpoints" / "last.pt"), load(last)
    assert b["state"]["step"] == a["state"]["step"] == 16
    for name, t in a["model"].items():
        assert torch.equal(t, b["model"][name]), name
    for name, t in a["ema_full"].items():
        assert torch.equal(t, b["ema_full"][name]), name


def test_ddp_two_processes_equal_one_process(tmp_path):
    data = write_faces(tmp_path / "faces", n_identities=4, n_images=2, size=32)
    args = ["--epochs", "1", "--batch-size", "8", "--hflip", "0", "--val-fraction", "0", "--warmup-epochs", "0",
            "--lr", "0.05", "--loss", "cosface", "--optimizer", "sgd"]
    # SGD: a first Adam step is lr * sign(g) for tiny g, which magnifies float rounding between runs
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(_train_cmd(data, tmp_path / "one", *args), check=True, env=env, capture_output=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           *_train_cmd(data, tmp_path / "two", *args)[1:]]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    one, two = load(tmp_path / "one" / "checkpoints" / "last.pt"), load(tmp_path / "two" / "checkpoints" / "last.pt")
    assert one["state"]["step"] == two["state"]["step"] == 1
    init = None
    for name, t in one["model"].items():
        torch.testing.assert_close(two["model"][name], t, atol=2e-5, rtol=1e-4, msg=name)
    # the step really moved the weights (so the comparison is not of two initial states)
    moved = [n for n, t in one["model"].items() if t.is_floating_point() and "weight" in n]
    assert init is None and moved


def test_triton_kernels_in_a_training_step(tmp_path):
    """--kernels triton trains through both fused kernels (interpreted on CPU) and matches --kernels torch."""
    data = write_faces(tmp_path / "faces", n_identities=3, n_images=2, size=32)
    args = ["--epochs", "1", "--batch-size", "6", "--hflip", "0", "--val-fraction", "0", "--warmup-epochs", "0",
            "--optimizer", "sgd", "--lr", "0.1", "--loss", "arcface", "--backbone", "convnext_atto",
            "--embedding-dim", "16", "--image-size", "32", "--workers", "0", "--no-progress", "--threads", "1"]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    runs = {}
    for backend in ("torch", "triton"):
        cmd = [sys.executable, "-m", "facefuse.cli", "train", "--data", str(data), "--out", str(tmp_path / backend),
               "--kernels", backend, *args]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        runs[backend] = load(tmp_path / backend / "checkpoints" / "last.pt")["model"]
    for name, t in runs["torch"].items():
        torch.testing.assert_close(runs["triton"][name], t, atol=1e-4, rtol=1e-3, msg=name)


def test_triton_without_gpu_or_interpreter_is_an_error(faces, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-m", "facefuse.cli", "train", "--data", str(faces), "--out",
                        str(tmp_path / "run"), "--kernels", "triton", "--device", "cpu", *TINY],
                       env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "--kernels triton: needs --device cuda" in r.stderr and "use --kernels torch" in r.stderr


@pytest.mark.parametrize("loss", ["adaface", "subcenter_arcface"])
def test_train_with_the_adaptive_heads(faces, tmp_path, loss):
    out = tmp_path / loss
    r = run_cli("train", "--data", faces, "--out", out, "--epochs", 3, "--batch-size", 8, "--loss", loss,
                "--scale", 16, "--val-fraction", 0.2, "--lr", 3e-3, *TINY)
    assert r.exit_code == 0, r.output
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["train_loss"] < records[0]["train_loss"]  # it learns
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    keys = " ".join(k for part in state.values() if isinstance(part, dict) for k in part)
    assert ("norm_mean" in keys) == (loss == "adaface")  # AdaFace's running norm statistics are saved
