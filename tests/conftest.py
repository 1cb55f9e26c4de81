import os

import torch

# Triton kernels run under the interpreter when no GPU is present; this must be set
# before any kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from facefuse.core.paths import lfw_dir  # noqa: E402


@pytest.fixture(scope="session")
def lfw():
    """The shared LFW folder (112x112 aligned + pairs files); skip when it is absent."""
    root = lfw_dir()
    if not (root / "lfw-112").is_dir() or not (root / "pairs.txt").is_file():
        pytest.skip(f"LFW data not found at {root} (set FACEFUSE_DATA)")
    return root


def write_faces(root, n_identities=4, n_images=6, size=48, seed=0, ext=".jpg"):
    """Synthetic identities: each has its own coarse colour pattern plus per-image noise, so a
    small network can actually learn to tell them apart."""
    import numpy as np
    from PIL import Image

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


@pytest.fixture
def faces(tmp_path):
    return write_faces(tmp_path / "faces")


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread: on a small shared CPU, OpenMP threads spin-waiting for each other make
    tiny models 10-30x slower. Restored afterwards for other test modules."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_model_file(path, seed=0, dim=32):
    """A small random embedding model saved as a facefuse model file."""
    from facefuse.trainer.checkpoint import ModelMeta, save_model_file
    from facefuse.trainer.config import ModelConfig
    from facefuse.trainer.model import build_model

    cfg = ModelConfig(backbone="resnet18", embedding_dim=dim, image_size=64, width=0.25)
    torch.manual_seed(seed)
    model = build_model(cfg, 10).eval()
    save_model_file(path, model, ModelMeta.for_model(cfg, model, 10, (0.5,) * 3, (0.5,) * 3))
    return path


def kernel_devices(interpreting: bool) -> list[str]:
    """Where kernel tests run: the interpreter on CPU, else a real GPU, else nowhere (skip)."""
    if interpreting:
        return ["cpu"]
    return ["cuda"] if torch.cuda.is_available() else []


def assert_one_line_error(result, *fragments):
    """A CliRunner result that failed with exit 2 and one `error:` line holding every fragment."""
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for f in fragments:
        assert f in lines[0], lines[0]
