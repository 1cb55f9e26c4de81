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
