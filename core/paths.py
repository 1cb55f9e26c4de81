"""Where the shared real-face data lives: one setting, ``FACEFUSE_DATA``."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def shared_data_dir() -> Path:
    """``$FACEFUSE_DATA`` if set, else ``../shared/data`` beside the repository root."""
    env = os.environ.get("FACEFUSE_DATA")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data"


def lfw_dir() -> Path:
    return shared_data_dir() / "lfw"
