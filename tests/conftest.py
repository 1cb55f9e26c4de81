import os

import torch

# Triton kernels run under the interpreter when no GPU is present; this must be set
# before any kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _interpreter_loop_bounds_fix():
    """Triton < 3.8's interpreter reads a runtime loop bound as ``int(array of shape (1,))``, which
    numpy >= 2.4 refuses (triton-lang/triton#9171; the device image pairs triton 3.6 with numpy 2.5).
    Give it the upstream fix, ``int(data.squeeze())``, for the interpreter tests only."""
    import triton
    from triton.runtime import interpreter

    fixed = tuple(int(x) for x in triton.__version__.split(".")[:2]) >= (3, 8)
    if fixed or not hasattr(interpreter, "_LangPatchScope"):  # the scope API the fix is written for
        return
    patch = interpreter._patch_lang_tensor

    def patch_lang_tensor(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patch_lang_tensor


if os.environ.get("TRITON_INTERPRET") == "1":
    _interpreter_loop_bounds_fix()

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
