"""Face datasets: one sub-folder per identity, images of any size and mode.

Scanning finds identities and images, drops excluded identities, optionally decodes every image
once (so a corrupt file is reported before training rather than in the middle of an epoch), and
splits off a held-out image set for closed-set classification accuracy.
"""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from torch.utils.data import Dataset

from facefuse.core.errors import BadImageError, FacefuseError, ParameterError
from facefuse.core.images import IGNORED_NAMES, IMAGE_EXTENSIONS, eval_transform, open_rgb  # noqa: F401

@dataclass
class ImageList:
    """Images and integer labels; ``classes[label]`` is the identity name."""

    paths: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)


def read_identity_list(path: str | Path, param: str = "data.exclude_identities") -> set[str]:
    path = Path(path)
    if not path.is_file():
        raise ParameterError(param, path, "no such file")
    names = set()
    for line in path.read_text().splitlines():
        name = line.strip()
        if name and not name.startswith("#"):
            names.add(name)
    return names


def scan_identities(root: str | Path, *, exclude: set[str] = frozenset(), min_images: int = 1,
                    skip_bad: bool = False) -> tuple[ImageList, list[str]]:
    """Walk ``root/<identity>/<image>``. Returns the image list and the problems skipped."""
    root = Path(root)
    if not str(root) or not root.exists():
        raise ParameterError("data.root", root, "no such folder")
    if not root.is_dir():
        raise ParameterError("data.root", root, "not a folder")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise ParameterError("data.root", root, "no identity sub-folders (expected one folder of images per identity)")
    skipped: list[str] = []
    out = ImageList()
    for folder in folders:
        if folder.name in exclude:
            continue
        images = []
        for f in sorted(folder.iterdir()):
            if f.name.startswith(".") or f.name in IGNORED_NAMES or f.is_dir():
                continue
            if f.suffix.lower() not in IMAGE_EXTENSIONS:
                if not skip_bad:
                    raise FacefuseError(f"{f}: not an image file (extension {f.suffix or 'none'}); "
                                        "remove it or pass data.skip_bad=True")
                skipped.append(f"{f}: not an image file")
                continue
            images.append(str(f))
        if not images:
            if not skip_bad:
                raise FacefuseError(f"{folder}: identity folder without images; remove it or pass data.skip_bad=True")
            skipped.append(f"{folder}: no images")
            continue
        if len(images) < min_images:
            continue
        label = len(out.classes)
        out.classes.append(folder.name)
        out.paths.extend(images)
        out.labels.extend([label] * len(images))
    if not out.paths:
        raise ParameterError("data.root", root, f"no images left after exclusions and data.min_images={min_images}")
    if len(out.classes) < 2:
        raise ParameterError("data.root", root, f"need at least 2 identities to train a classifier, found "
                            f"{len(out.classes)}")
    return out, skipped


def verify_images(images: ImageList, *, skip_bad: bool, threads: int = 4) -> tuple[ImageList, list[str]]:
    """Decode every image once; a bad one is an error, or dropped and counted with ``skip_bad``."""

    def check(path):
        try:
            open_rgb(path)
            return None
        except BadImageError as exc:
            return str(exc)

    with ThreadPoolExecutor(max_workers=threads) as pool:
        problems = list(pool.map(check, images.paths, chunksize=64))
    bad = [p for p in problems if p]
    if bad and not skip_bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise FacefuseError(f"{bad[0]}{more}; pass data.skip_bad=True to skip bad images")
    if not bad:
        return images, []
    keep = [i for i, p in enumerate(problems) if p is None]
    used = sorted({images.labels[i] for i in keep})
    remap = {old: new for new, old in enumerate(used)}
    out = ImageList([images.paths[i] for i in keep], [remap[images.labels[i]] for i in keep],
                    [images.classes[c] for c in used])
    return out, bad


def split_holdout(images: ImageList, fraction: float, seed: int) -> tuple[ImageList, ImageList]:
    """Hold out about ``fraction`` of all images for closed-set accuracy, drawn only from identities
    with >= 2 images and never an identity's last training image."""
    rng = random.Random(seed)
    by_label: dict[int, list[int]] = {}
    for i, y in enumerate(images.labels):
        by_label.setdefault(y, []).append(i)
    candidates = []
    for idx in by_label.values():
        idx = idx[:]
        rng.shuffle(idx)
        candidates += idx[1:]  # idx[0] always stays in training
    rng.shuffle(candidates)
    val_idx = set(candidates[: int(round(fraction * len(images)))])
    pick = lambda keep: ImageList([images.paths[i] for i in range(len(images)) if keep(i)],  # noqa: E731
                                  [images.labels[i] for i in range(len(images)) if keep(i)], images.classes)
    return pick(lambda i: i not in val_idx), pick(lambda i: i in val_idx)


class FaceDataset(Dataset):
    """(image tensor, label) pairs; a bad image at load time raises BadImageError naming it."""

    def __init__(self, images: ImageList, transform):
        self.images = images
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.transform(open_rgb(self.images.paths[i])), self.images.labels[i]
