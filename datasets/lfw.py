"""LFW from its published files to the layout ``train`` and ``verify`` read (``facefuse data lfw DIR``).

:func:`fetch_lfw` downloads one image archive of the public LFW release and the three official pairs
files (:func:`lfw_release`: the table of URLs and pinned digests), checks each against its digest,
unpacks the archive safely, aligns every photo onto the 112 x 112 template with
:func:`facefuse.align.align_folder` (MTCNN; a photo without a detected face becomes its centre
square, as in the shared ``lfw-112``) and leaves::

    DIR/lfw/lfw-112/<Name>/<Name>_NNNN.jpg    (+ align's manifest.jsonl and align.json)
    DIR/lfw/pairs.txt, pairsDevTrain.txt, pairsDevTest.txt
    DIR/lfw/raw/<Name>/<Name>_NNNN.jpg        (only with keep_raw=True)

which is what ``facefuse.core.paths.lfw_dir()`` reads with ``FACEFUSE_DATA=DIR``.

All work happens in ``DIR/.partial/`` (downloads as ``<file>.part``, then the unpacked photos and the
crops in ``DIR/.partial/lfw``); ``DIR/lfw`` appears by one rename once every pairs image has its
crop, and ``.partial`` is removed after it. A run stopped anywhere (a cut connection, a wrong
digest, Ctrl-C) leaves no ``DIR/lfw``; the next run into the same ``DIR`` continues: verified
downloads are reused, a ``.part`` is resumed, an unpacked archive is kept and alignment skips the
photos its manifest already lists.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from facefuse.align import align_folder
from facefuse.core.errors import FacefuseError, ParameterError
from facefuse.core.pairs import read_pairs

from .download import Remote, fetch
from .unpack import unpack_tar

PARTIAL = ".partial"
PAIRS_FILES = ("pairs.txt", "pairsDevTrain.txt", "pairsDevTest.txt")

# The published files and their digests. Each digest is copied from the source named beside it;
# none is computed here from a download.
#
# scikit-learn pins the figshare mirror of LFW that `fetch_lfw_people` / `fetch_lfw_pairs` use, with
# sha256 digests (sklearn/datasets/_lfw.py: ARCHIVE, FUNNELED_ARCHIVE, TARGETS; scikit-learn 1.9.1).
# The three pairs digests are also those of the shared data's own pairs*.txt (checked when written).
# torchvision pins LFW's own site, vis-www.cs.umass.edu/lfw/, with md5 digests
# (torchvision/datasets/lfw.py: _LFW.file_dict; torchvision 0.29.1); that is the only published
# location of the deep-funneled archive, and it no longer answers (torchvision raises instead of
# downloading since pytorch/vision#8888; tensorflow/datasets#11020 moved to the figshare mirror
# because the site "is currently not resolving"). Hence the default is the funneled archive from
# the mirror; images="deepfunneled" needs url_base= pointing at a copy of the same file.
_FIGSHARE = "https://ndownloader.figshare.com/files/"
_UMASS = "http://vis-www.cs.umass.edu/lfw/"
ARCHIVES = {
    "funneled": Remote("lfw-funneled.tgz", _FIGSHARE + "5976015",  # scikit-learn FUNNELED_ARCHIVE
                       "sha256:b47c8422c8cded889dc5a13418c4bc2abbda121092b3533a83306f90d900100a"),
    "original": Remote("lfw.tgz", _FIGSHARE + "5976018",  # scikit-learn ARCHIVE
                       "sha256:055f7d9c632d7370e6fb4afc7468d40f970c34a80d4c6f50ffec63f5a8d536c0"),
    "deepfunneled": Remote("lfw-deepfunneled.tgz", _UMASS + "lfw-deepfunneled.tgz",  # torchvision file_dict
                           "md5:68331da3eb755a505a502b5aacb3c201"),
}
PAIRS = (  # scikit-learn TARGETS
    Remote("pairs.txt", _FIGSHARE + "5976006",
           "sha256:ea42330c62c92989f9d7c03237ed5d591365e89b3e649747777b70e692dc1592"),
    Remote("pairsDevTrain.txt", _FIGSHARE + "5976012",
           "sha256:1d454dada7dfeca0e7eab6f65dc4e97a6312d44cf142207be28d688be92aabfa"),
    Remote("pairsDevTest.txt", _FIGSHARE + "5976009",
           "sha256:7cb06600ea8b2814ac26e946201cdb304296262aad67d046a16a7ec85d0ff87c"),
)


@dataclass(frozen=True)
class LfwRelease:
    """What :func:`fetch_lfw` downloads: one image archive (a tar holding ``<Name>/<Name>_NNNN.jpg``,
    under one top folder or none) and the three pairs files."""

    archive: Remote
    pairs: tuple[Remote, ...]

    def __post_init__(self):
        names = sorted(r.name for r in self.pairs)
        if names != sorted(PAIRS_FILES):
            raise ParameterError("pairs", ", ".join(names), f"expected the files {', '.join(PAIRS_FILES)}")

    @property
    def files(self) -> tuple[Remote, ...]:
        return (self.archive, *self.pairs)


def lfw_release(images: str = "funneled", *, url_base: str | None = None,
                sha256: dict[str, str] | None = None) -> LfwRelease:
    """The pinned files for ``images`` (a key of :data:`ARCHIVES`). ``url_base``: a mirror that holds
    the same files under their names (``<url_base>/lfw-funneled.tgz``, ``<url_base>/pairs.txt``);
    ``sha256``: ``{file name: hex}`` digests that replace the pinned ones (for a mirror of other bytes)."""
    if images not in ARCHIVES:
        raise ParameterError("images", images, f"valid: {', '.join(ARCHIVES)}")
    files = [ARCHIVES[images], *PAIRS]
    sha256 = dict(sha256 or {})
    unknown = sorted(set(sha256) - {r.name for r in files})
    if unknown:
        raise ParameterError("sha256", ", ".join(unknown),
                             f"not a file of this release ({', '.join(r.name for r in files)})")
    for name, hexdigest in sha256.items():
        if not re.fullmatch("[0-9a-fA-F]{64}", hexdigest):
            raise ParameterError("sha256", f"{name}={hexdigest}", "expected 64 hex digits")
    if url_base is not None:
        if not url_base.startswith(("http://", "https://")):
            raise ParameterError("url_base", url_base, "must be an http:// or https:// URL")
        files = [replace(r, url=url_base.rstrip("/") + "/" + r.name) for r in files]
    files = [replace(r, digest=f"sha256:{sha256[r.name].lower()}") if r.name in sha256 else r for r in files]
    return LfwRelease(files[0], tuple(files[1:]))


@dataclass
class LfwSummary:
    """What one :func:`fetch_lfw` run did (``downloaded``: bytes received per file this run)."""

    dir: str
    lfw: str
    archive: str
    downloaded: dict[str, int] = field(default_factory=dict)
    identities: int = 0
    align: dict = field(default_factory=dict)
    kept_raw: bool = False
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def fetch_lfw(dir, *, images: str = "funneled", release: LfwRelease | None = None, url_base: str | None = None,
              sha256: dict[str, str] | None = None, workers: int | None = None, keep_raw: bool = False,
              detector="mtcnn", progress=None, timeout: float = 60.0, retries: int = 3,
              retry_wait: float = 2.0) -> LfwSummary:
    """Download, check, unpack and align LFW into ``dir/lfw`` (module docstring). ``release``
    replaces the pinned table (``images``, ``url_base`` and ``sha256`` build it otherwise);
    ``workers``, ``detector``: as :func:`~facefuse.align.align_folder`; ``progress``: tqdm bars on
    stderr (True) or none; ``timeout`` (seconds without data), ``retries``, ``retry_wait``: per file,
    see :func:`~facefuse.datasets.download.fetch`."""
    t0 = time.perf_counter()
    root = Path(dir)
    final = root / "lfw"
    if root.exists() and not root.is_dir():
        raise ParameterError("dir", dir, "exists and is not a folder")
    if final.exists():
        raise ParameterError("dir", dir, f"already holds {final}; move it away or choose another folder")
    release = release or lfw_release(images, url_base=url_base, sha256=sha256)
    work = root / PARTIAL
    made = [p for p in (root, work) if not p.exists()]
    work.mkdir(parents=True, exist_ok=True)
    summary = LfwSummary(str(root), str(final), release.archive.name, kept_raw=keep_raw)
    try:
        _build(work, final, release, summary, keep_raw=keep_raw,
               fetch_options=dict(timeout=timeout, retries=retries, retry_wait=retry_wait, progress=progress),
               align_options=dict(detector=detector, workers=workers, progress=progress))
    except BaseException:
        _tidy(made)
        raise
    shutil.rmtree(work)
    summary.seconds = time.perf_counter() - t0
    return summary


def _build(work: Path, final: Path, release: LfwRelease, summary: LfwSummary, *, keep_raw: bool,
           fetch_options: dict, align_options: dict) -> None:
    """The steps, in ``work``; ``final`` appears by the last rename."""
    with _lock(work):
        paths = {}
        for remote in release.files:
            paths[remote.name], summary.downloaded[remote.name] = fetch(remote, work, **fetch_options)
        stage = work / "lfw"
        raw = _unpacked(paths[release.archive.name], stage, work)
        for name in PAIRS_FILES:
            shutil.copyfile(paths[name], stage / name)
        crops = stage / "lfw-112"
        aligned = align_folder(raw, crops, size=112, on_none="center", on_multiple="largest", **align_options)
        summary.align = aligned.to_dict()
        _check_pairs(stage, crops)
        summary.identities = sum(1 for p in crops.iterdir() if p.is_dir())
        if not keep_raw:
            shutil.rmtree(raw)
        os.rename(stage, final)


def _tidy(made: list[Path]) -> None:
    """After a failure: remove the folders this run created if nothing worth resuming is in them."""
    for folder in reversed(made):  # .partial first, then DIR
        left = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
        if left <= {".lock"}:
            shutil.rmtree(folder, ignore_errors=True)


def _unpacked(archive: Path, stage: Path, work: Path) -> Path:
    """``stage/raw``: the archive's identity folders, unpacked once (the rename marks it complete)."""
    raw = stage / "raw"
    if raw.is_dir():
        return raw
    tmp = work / "unpack"
    if tmp.exists():
        shutil.rmtree(tmp)  # an unpacking that was stopped: start it again
    top = unpack_tar(archive, tmp)
    inner = tmp / top[0] if len(top) == 1 and (tmp / top[0]).is_dir() else tmp
    if not any(p.is_dir() for p in inner.iterdir()):
        raise FacefuseError(f"{archive}: holds no identity folders (expected <Name>/<Name>_NNNN.jpg)")
    stage.mkdir(parents=True, exist_ok=True)
    os.rename(inner, raw)
    shutil.rmtree(tmp, ignore_errors=True)
    return raw


def _check_pairs(stage: Path, crops: Path) -> None:
    """Every image a pairs file names has its crop (else the archive and the pairs disagree)."""
    for name in PAIRS_FILES:
        pairs = read_pairs(stage / name, root=crops)
        missing = [p for p in pairs.images if not p.is_file()]
        if missing:
            raise FacefuseError(f"{name}: {len(missing)} of its {len(pairs.images)} images have no crop in "
                                f"{crops} (first: {missing[0].relative_to(crops)}); the archive and the pairs "
                                "files do not belong together")


@contextmanager
def _lock(work: Path):
    """One run at a time per ``DIR``: a second one fails at once instead of mixing files."""
    with open(work / ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FacefuseError(f"{work.parent}: another fetch_lfw run is using this folder") from None
        yield
