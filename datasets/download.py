"""One published file, fetched over HTTP(S) with a pinned checksum, resumable.

:func:`fetch` streams ``remote.url`` to ``folder/<name>.part``; a ``.part`` left by an earlier run
is continued with an HTTP ``Range`` request (a server that ignores the range and answers with the
whole file is read from the start again). A body shorter than its announced length, a reset or a
timeout is retried ``retries`` times, each retry continuing where the last one stopped. The whole
file is then hashed and, only if it matches the pinned digest, renamed to ``folder/<name>``: a file
under its final name is always a verified one. A wrong digest removes the ``.part`` (its bytes are
wrong; continuing it cannot help) and raises one line naming the file and the URL; a connection
that stays cut raises one line too and keeps the ``.part`` for the next run to continue.

Plain ``urllib``: redirects are followed (the ``Range`` header with them), proxies come from the
usual environment variables.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from facefuse.core.errors import FacefuseError, ParameterError

CHUNK = 1 << 20
DIGESTS = ("sha256", "md5")
USER_AGENT = "facefuse-data/1"
_TRANSIENT = (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError, socket.timeout)


@dataclass(frozen=True)
class Remote:
    """A published file: the ``name`` it is stored under, where it is, and its pinned digest
    ``"<algorithm>:<hex>"`` (``sha256`` or ``md5``, whichever the cited source pins)."""

    name: str
    url: str
    digest: str

    def __post_init__(self):
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ParameterError("name", self.name, "must be a plain file name")
        algo, _, hexdigest = self.digest.partition(":")
        size = {"sha256": 64, "md5": 32}.get(algo)
        if size is None or not re.fullmatch(f"[0-9a-f]{{{size}}}", hexdigest):
            raise ParameterError("digest", self.digest, f"expected sha256:<64 hex digits> or md5:<32 hex digits> "
                                 f"for {self.name}")

    @property
    def algorithm(self) -> str:
        return self.digest.partition(":")[0]

    @property
    def hexdigest(self) -> str:
        return self.digest.partition(":")[2]


class _Cut(Exception):
    """The body ended before its announced length."""


class _RangeDone(Exception):
    """The server says the range past our ``.part`` is empty: the ``.part`` may be whole."""


def fetch(remote: Remote, folder, *, timeout: float = 60.0, retries: int = 3, retry_wait: float = 2.0,
          progress=None) -> tuple[Path, int]:
    """Download ``remote`` into ``folder`` (module docstring); return its verified path and the
    number of bytes this call received (0 when a verified copy was already there).
    ``progress``: None/False (silent), True (a tqdm bar on stderr, on a terminal only) or a
    callable given the bytes received each time."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    final, part = folder / remote.name, folder / f"{remote.name}.part"
    if final.is_file():
        if file_digest(final, remote.algorithm) == remote.hexdigest:
            return final, 0
        final.unlink()  # only verified files get this name; this one changed since: fetch again
    received, attempt = [0], 0  # bytes written by this call, cut attempts included
    while True:
        try:
            _stream(remote, part, timeout, progress, received)
            break
        except _RangeDone:
            break
        except (_Cut, *_TRANSIENT) as exc:
            if isinstance(exc, urllib.error.HTTPError) and exc.code < 500:
                raise FacefuseError(f"{remote.url}: HTTP {exc.code} {exc.reason} (fetching {remote.name})") from None
            if attempt >= retries:
                have = part.stat().st_size if part.exists() else 0
                kept = f"the {have} bytes in {part} are kept: run again to resume" if have else "run again to retry"
                raise FacefuseError(f"{remote.url}: download of {remote.name} stopped at byte {have} "
                                    f"({_reason(exc)}); {kept}") from None
            attempt += 1
            time.sleep(retry_wait * attempt)
    got = file_digest(part, remote.algorithm)
    if got != remote.hexdigest:
        part.unlink()
        raise FacefuseError(f"{remote.name}: {remote.algorithm} {got} does not match the pinned {remote.hexdigest} "
                            f"({remote.url}); the download was removed")
    os.replace(part, final)
    return final, received[0]


def _stream(remote: Remote, part: Path, timeout: float, progress, received: list[int]) -> None:
    """One request: continue ``part`` from its size (or start it over); ``received[0]`` counts the
    bytes written."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(remote.url, headers={"User-Agent": USER_AGENT})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # nothing past our bytes: the digest decides
            raise _RangeDone() from None
        raise
    with response:
        if have and response.status == 206:
            start, total = _content_range(response.headers.get("Content-Range"), remote.url)
            if start != have:
                raise http.client.HTTPException(f"asked for bytes from {have}, the server sent from {start}")
            mode = "ab"
        else:  # 200: the whole file (a server that ignores Range, or a first request)
            have, total, mode = 0, None, "wb"
        length = response.headers.get("Content-Length")
        expected = int(length) if length and length.isdigit() else None
        if total is None and expected is not None:
            total = expected
        _copy(response, part, mode, have, expected, total, remote.name, progress, received)


def _copy(response, part: Path, mode: str, have: int, expected, total, name: str, progress, received) -> None:
    bar, tick = _progress(progress, total, have, name)
    written = 0
    try:
        with open(part, mode) as f:
            while chunk := response.read(CHUNK):
                f.write(chunk)
                written += len(chunk)
                received[0] += len(chunk)
                tick(len(chunk))
            f.flush()
            os.fsync(f.fileno())
    finally:
        if bar is not None:
            bar.close()
    if expected is not None and written < expected:
        raise _Cut(f"{written} of {expected} bytes received")


def _content_range(value: str | None, url: str) -> tuple[int, int | None]:
    """``bytes START-END/TOTAL`` -> ``(START, TOTAL or None)``."""
    m = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", (value or "").strip())
    if not m:
        raise http.client.HTTPException(f"{url}: a partial answer without a valid Content-Range ({value!r})")
    return int(m.group(1)), None if m.group(2) == "*" else int(m.group(2))


def _progress(progress, total, initial: int, name: str):
    if progress is None or progress is False:
        return None, lambda n: None
    if progress is True:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024, desc=name,
                   disable=None)
        return bar, bar.update
    return None, progress


def _reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.URLError) and not isinstance(exc, urllib.error.HTTPError):
        exc = exc.reason if isinstance(exc.reason, BaseException) else exc
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())


def file_digest(path, algorithm: str) -> str:
    """Hex digest of a file, read in chunks."""
    if algorithm not in DIGESTS:
        raise ParameterError("algorithm", algorithm, f"valid: {', '.join(DIGESTS)}")
    h = hashlib.new(algorithm, usedforsecurity=False)  # an integrity check, not a signature
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()
