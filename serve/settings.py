"""Every setting of the service, in one frozen dataclass checked on creation."""

from __future__ import annotations

import dataclasses
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from facefuse.core.errors import ParameterError
from facefuse.core.settings import ALIGNMENTS

LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class ServeSettings:
    """``model``: an ONNX file or a checkpoint / run folder; ``index``: a gallery folder (built by
    ``facefuse index build``). ``align``: how a photo's faces are found when a request does not say
    (``landmarks``: every face by MTCNN; ``none``: the upload is already an aligned crop).
    ``max_batch`` faces per model run, gathered for at most ``max_wait_ms`` while other requests
    are on their way (1: every request runs alone). ``threads``: the pool that decodes, detects
    and searches. ``max_upload_bytes`` per request body, ``max_pixels`` per decoded photo.
    ``keys``: the API-keys file (None: no authentication, allowed on loopback only)."""

    model: Path
    index: Path
    host: str = LOOPBACK
    port: int = 8000
    align: str = "landmarks"
    top_k: int = 5
    far: float | None = None          # decide at the model's threshold calibrated at this FAR
    threshold: float | None = None    # or at this cosine
    max_batch: int = 64
    max_wait_ms: float = 5.0
    threads: int = 4
    max_upload_bytes: int = 10 * 2**20
    max_pixels: int = 40_000_000
    keys: Path | None = None
    allow_no_auth: bool = False       # serve without keys on a non-loopback address (not advised)

    def __post_init__(self):
        object.__setattr__(self, "model", Path(self.model))
        object.__setattr__(self, "index", Path(self.index))
        if self.keys is not None:
            object.__setattr__(self, "keys", Path(self.keys))
        if self.align not in ALIGNMENTS:
            raise ParameterError("align", self.align, f"unknown alignment; valid: {', '.join(ALIGNMENTS)}")
        _positive_int("port", self.port, low=0, high=65535)
        for name in ("top_k", "max_batch", "threads", "max_upload_bytes", "max_pixels"):
            _positive_int(name, getattr(self, name))
        if not (0 <= self.max_wait_ms <= 1000):
            raise ParameterError("max_wait_ms", self.max_wait_ms, "must be in [0, 1000] milliseconds")
        if self.far is not None and self.threshold is not None:
            raise ParameterError("threshold", self.threshold, "give threshold= or far=, not both")
        if self.keys is None and not self.allow_no_auth and not is_loopback(self.host):
            raise ParameterError("host", self.host, "serving beyond loopback needs API keys (keys=FILE); "
                                 "allow_no_auth=True to serve it open anyway")

    def replace(self, **changes) -> "ServeSettings":
        return dataclasses.replace(self, **changes)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _positive_int(name: str, value, low: int = 1, high: int | None = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
        rng = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ParameterError(name, value, f"must be an integer {rng}")
