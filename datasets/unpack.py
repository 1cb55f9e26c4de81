"""Unpack a downloaded tar archive without trusting it.

Every member is checked before it is written: no absolute name, no ``..``, no link that points out
of the destination, nothing but files, folders and links inside it (no devices, no FIFOs). Where
Python has the ``data`` extraction filter (3.12, and 3.8-3.11 security releases) it is applied as
well, so modes and owners from the archive are not taken either.
"""

from __future__ import annotations

import gzip
import posixpath
import tarfile
import zlib
from pathlib import Path

from facefuse.core.errors import FacefuseError

_FILTER = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
_FILTER_ERROR = getattr(tarfile, "FilterError", ())


def unpack_tar(archive, dest) -> list[str]:
    """Extract ``archive`` (tar, optionally gzip/bz2/xz) into the folder ``dest`` (created); return
    the top-level names it held. A bad member or a corrupt archive raises one line naming both."""
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    top = set()
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                _check(member, archive)
                tar.extract(member, dest, **_FILTER)
                top.add(member.name.strip("/").split("/", 1)[0])
    except _FILTER_ERROR as exc:
        raise FacefuseError(f"{archive}: unsafe member refused ({exc})") from None
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise FacefuseError(f"{archive}: not a readable tar archive ({type(exc).__name__}: {exc})") from None
    except OSError as exc:
        raise FacefuseError(f"{archive}: could not unpack into {dest} ({exc})") from None
    top.discard("")
    top.discard(".")
    return sorted(top)


def _check(member: tarfile.TarInfo, archive: Path) -> None:
    name = member.name
    if _escapes(name):
        raise FacefuseError(f"{archive}: member {name!r} would be written outside the folder; refused")
    if member.issym() or member.islnk():
        base = posixpath.dirname(name) if member.issym() else ""
        if _escapes(posixpath.join(base, member.linkname)) or member.linkname.startswith("/"):
            raise FacefuseError(f"{archive}: link {name!r} -> {member.linkname!r} points outside the folder; refused")
    elif not (member.isfile() or member.isdir()):
        raise FacefuseError(f"{archive}: member {name!r} is not a file, folder or link; refused")


def _escapes(name: str) -> bool:
    """An absolute path, a Windows drive, or one that climbs above its start after normalisation."""
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return True
    norm = posixpath.normpath(name.replace("\\", "/"))
    return norm == ".." or norm.startswith("../")
