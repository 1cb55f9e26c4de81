import os

import torch

# Triton kernels run under the interpreter when no GPU is present; this must be set
# before any kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from helpers import write_faces  # noqa: E402

from facefuse.core.paths import lfw_dir  # noqa: E402


@pytest.fixture(scope="session")
def lfw():
    """The shared LFW folder (112x112 aligned + pairs files); skip when it is absent."""
    root = lfw_dir()
    if not (root / "lfw-112").is_dir() or not (root / "pairs.txt").is_file():
        pytest.skip(f"LFW data not found at {root} (set FACEFUSE_DATA)")
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
