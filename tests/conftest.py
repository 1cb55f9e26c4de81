import os

import torch

# Triton kernels run under the interpreter when no GPU is present; this must be set
# before any kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from trainer.paths import lfw_dir  # noqa: E402


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
