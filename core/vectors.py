"""Vector helpers that need numpy only (no torch), so FAISS-side code imports them cheaply."""

from __future__ import annotations

import numpy as np


def l2_normalize(x) -> np.ndarray:
    """Rows scaled to unit L2 norm: a new float32 array, zero rows stay zero."""
    x = np.array(x, dtype=np.float32, copy=True)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D array of vectors, got shape {x.shape}")
    n = np.linalg.norm(x, axis=1, keepdims=True)
    np.divide(x, n, out=x, where=n > 0)
    return x
