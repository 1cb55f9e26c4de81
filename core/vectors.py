"""Vector helpers that need numpy only (no torch), so FAISS-side code imports them cheaply."""

from __future__ import annotations

import numpy as np

from .errors import ParameterError


def l2_normalize(x) -> np.ndarray:
    """Rows scaled to unit L2 norm: a new float32 array, zero rows stay zero."""
    x = np.array(x, dtype=np.float32, copy=True)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D array of vectors, got shape {x.shape}")
    n = np.linalg.norm(x, axis=1, keepdims=True)
    np.divide(x, n, out=x, where=n > 0)
    return x


CENTER_MIN_ROWS = 50  # below this the mean is mostly the few faces' own identities, not the domain's


def center_rows(x, ok=None, *, where: str = "these images") -> np.ndarray:
    """Unit rows centred on their own mean: ``l2_normalize(l2_normalize(x) - mean)``, the mean taken over
    the rows in ``ok`` (all by default); rows outside ``ok`` are returned as they are.

    The mean of a set's embeddings is what its faces share (grey scale, one camera, one lighting rig):
    removing it before cosine scoring makes one threshold hold across sets (benchmarks/README.md,
    "Centring"). It needs a set, not a pair: fewer than ``CENTER_MIN_ROWS`` rows is an error.
    """
    x = l2_normalize(x)
    ok = np.ones(len(x), bool) if ok is None else np.asarray(ok, bool)
    if ok.sum() < CENTER_MIN_ROWS:
        raise ParameterError("center", True, f"{where}: {int(ok.sum())} images embedded; centring needs at least "
                            f"{CENTER_MIN_ROWS} (their mean is what the set's faces share)")
    x[ok] = l2_normalize(x[ok] - x[ok].mean(axis=0, dtype=np.float64).astype(np.float32))
    return x
