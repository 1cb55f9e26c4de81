"""Test helpers shared by every test module: synthetic face images, small model files, one CLI
runner and the one-line-error assertion. (Fixtures stay in conftest.py.)"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from click.testing import CliRunner
from PIL import Image


# ---------------------------------------------------------------- synthetic images


def write_faces(root, n_identities=4, n_images=6, size=48, seed=0, ext=".jpg"):
    """Training identities (``root/person_NN/img_NN.jpg``): each has its own coarse colour pattern
    plus strong per-image noise, so a small network can actually learn to tell them apart."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for c in range(n_identities):
        d = root / f"person_{c:02d}"
        d.mkdir(exist_ok=True)
        base = rng.integers(0, 255, (4, 4, 3))
        for i in range(n_images):
            img = np.kron(base, np.ones((size // 4, size // 4, 1))) + rng.normal(0, 25, (size, size, 3))
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(d / f"img_{i:02d}{ext}")
    return root


# file name of image j of identity `name`, per gallery layout
LAYOUTS = {
    "folders": lambda name, j: f"{name}/{j}.jpg",              # one folder per identity
    "flat": lambda name, j: f"{name}_{j}.jpg",                 # <identity>_<anything> in one folder
    "lfw": lambda name, j: f"{name}/{name}_{j + 1:04d}.jpg",   # LFW's own names (numbered from 1)
    "flat-png": lambda name, j: f"{name}_{j + 1}.png",
}


def write_identities(root, names, per_id, *, seed=0, size=72, layout="folders") -> dict[str, list]:
    """Gallery / pairs identities: a smooth random pattern per identity plus mild per-image noise.
    Returns ``{name: [paths]}``."""
    rng = np.random.default_rng(seed)
    out = {}
    for name in names:
        base = rng.normal(128, 50, (8, 8, 3))
        out[name] = []
        for j in range(per_id):
            img = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
            p = root / LAYOUTS[layout](name, j)
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).resize((size, size), Image.BICUBIC).save(p)
            out[name].append(p)
    return out


def write_images(folder, n=6, size=(80, 72), seed=0):
    """Unrelated images of mixed format and mode (JPEG/PNG, RGB/grey) for loaders and embedders."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        low = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
        im = Image.fromarray(low).resize(size, Image.BICUBIC)
        if i % 3 == 1:
            im = im.convert("L")  # grey images are converted to RGB by the loader
        p = folder / f"img{i}.{'png' if i % 2 else 'jpg'}"
        im.save(p)
        paths.append(p)
    return paths


# ---------------------------------------------------------------- model files


def make_model_file(path, *, backbone="resnet18", dim=32, size=64, seed=0, mean=(0.5,) * 3, std=(0.5,) * 3,
                    random_bn=False, **meta_kw):
    """A small random embedding model saved as a facefuse model file. ``random_bn`` gives the
    BatchNorm layers non-trivial running statistics, so eval mode differs from the identity."""
    from facefuse.core.meta import ModelMeta
    from facefuse.trainer.checkpoint import save_model_file
    from facefuse.trainer.config import ModelConfig
    from facefuse.trainer.model import build_model

    cfg = ModelConfig(backbone=backbone, embedding_dim=dim, image_size=size, width=0.25)
    torch.manual_seed(seed)
    model = build_model(cfg, 10)
    if random_bn:
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                    m.running_mean.uniform_(-0.2, 0.2)
                    m.running_var.uniform_(0.5, 2.0)
    meta = ModelMeta.for_model(cfg, model, 10, mean, std)
    save_model_file(path, model.eval(), dataclasses.replace(meta, **meta_kw))
    return path


# ---------------------------------------------------------------- the CLI


def run_cli(*args):
    """``facefuse ARGS`` in-process (click's runner); arguments may be paths or numbers."""
    from facefuse.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result, *fragments):
    """A CliRunner result that failed with exit 2 and one `error:` line holding every fragment."""
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for f in fragments:
        assert f in lines[0], lines[0]


def kernel_devices(interpreting: bool) -> list[str]:
    """Where kernel tests run: the interpreter on CPU, else a real GPU, else nowhere (skip)."""
    if interpreting:
        return ["cpu"]
    return ["cuda"] if torch.cuda.is_available() else []


def kill_at_step(proc, checkpoint, step: int, kill, timeout: float = 300.0) -> None:
    """Wait until the training ``proc`` has written ``checkpoint`` at ``step`` or later, then
    ``kill`` it (``kill(proc)``: SIGKILL of the process or of its group) and reap it. Asserts the
    run was still going, so a test of resume-after-kill cannot pass on a run that simply finished."""
    import time

    from facefuse.trainer.checkpoint import load

    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            if checkpoint.is_file() and load(checkpoint)["state"]["step"] >= step:
                break
        except Exception:  # noqa: BLE001 - the file may be mid-replace; try again
            pass
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    kill(proc)
    proc.wait()
