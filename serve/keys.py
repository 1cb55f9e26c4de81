"""API keys: random tokens handed out once, stored only as SHA-256 digests, checked in constant time.

A keys file is JSON, ``{"keys": [{"name": ..., "role": "read" | "write", "sha256": ...}]}``, written
by :func:`add_key` (mode 0600, atomically). A key is 32 random bytes (``ffk_`` + URL-safe base64),
so a fast hash is enough: nothing can be guessed from the digest. A ``read`` key may verify,
search, list and read metrics; a ``write`` key may also enrol and remove."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from facefuse.core.errors import FacefuseError, ParameterError
from facefuse.core.files import atomic_path

ROLES = ("read", "write")
PREFIX = "ffk_"


@dataclass(frozen=True)
class Principal:
    """Who a key belongs to, and what it may do."""

    name: str
    role: str

    @property
    def can_write(self) -> bool:
        return self.role == "write"


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


class KeyRing:
    """The keys of one file, looked up by :meth:`check`."""

    def __init__(self, entries: list[dict]):
        self._entries = [(bytes.fromhex(e["sha256"]), Principal(e["name"], e["role"])) for e in entries]

    @classmethod
    def load(cls, path: str | Path) -> "KeyRing":
        path = Path(path)
        try:
            doc = json.loads(path.read_text())
            entries = doc["keys"]
            for e in entries:
                if e["role"] not in ROLES or len(bytes.fromhex(e["sha256"])) != 32 or not e["name"]:
                    raise ValueError(f"bad entry {e.get('name')!r}")
        except FileNotFoundError:
            raise FacefuseError(f"{path}: no such keys file (make one with --add-key NAME)") from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise FacefuseError(f"{path}: not a facefuse keys file ({type(exc).__name__}: {exc})") from None
        if not entries:
            raise FacefuseError(f"{path}: holds no keys (add one with --add-key NAME)")
        return cls(entries)

    def check(self, key: str | None) -> Principal | None:
        """The key's owner, or None. Every stored digest is compared, each in constant time."""
        if not key:
            return None
        d = bytes.fromhex(digest(key))
        found = None
        for stored, who in self._entries:
            if hmac.compare_digest(stored, d):
                found = who
        return found


def add_key(path: str | Path, name: str, role: str = "write") -> str:
    """Make a new key for ``name`` with ``role``, store its digest in keys file ``path`` (created
    if absent) and return the key: the only time it is seen."""
    if role not in ROLES:
        raise ParameterError("role", role, f"valid: {', '.join(ROLES)}")
    if not name or not name.isprintable() or len(name) > 100:
        raise ParameterError("name", name, "a key name is 1-100 printable characters")
    path = Path(path)
    entries = json.loads(path.read_text())["keys"] if path.is_file() else []
    if any(e["name"] == name for e in entries):
        raise ParameterError("name", name, f"{path} already holds a key of that name")
    key = PREFIX + secrets.token_urlsafe(32)
    entries.append({"name": name, "role": role, "sha256": digest(key)})
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({"keys": entries}, indent=1) + "\n")
        os.chmod(tmp, 0o600)  # digests only, but nobody else needs to read them
    return key
