"""Image folders in, gallery folders out: what ``facefuse index build|add`` and ``facefuse search``
do, as functions over an :class:`export.runtime.Embedder`."""

from __future__ import annotations

from pathlib import Path

from facefuse.core.images import is_image
from facefuse.index.gallery import (Gallery, build_gallery, identity_from_name, load_gallery, read_meta,
                           save_gallery, scan_gallery, search_gallery)
from facefuse.core.errors import FacefuseError


def model_record(embedder, model_path: str | Path) -> dict:
    """What a gallery remembers of the model its vectors came from."""
    return {"fingerprint": embedder.fingerprint, "embedding_dim": embedder.dim,
            "backbone": embedder.meta.backbone, "path": str(Path(model_path).resolve())}


def build_index_folder(gallery_dir: str | Path, embedder, model_path: str | Path, out_dir: str | Path,
                       *, kind: str = "flat", batch_size: int = 64, num_workers: int | None = None,
                       flip_tta: bool = False, skip_missing: bool = False, **params) -> tuple[Gallery, int]:
    """Embed every image of ``gallery_dir`` and write the index folder ``out_dir``.
    Returns the gallery and the number of images skipped (only with ``skip_missing``)."""
    paths, ids = scan_gallery(gallery_dir)
    emb, ok = embedder.embed_paths(paths, batch_size=batch_size, num_workers=num_workers,
                                   flip_tta=flip_tta, skip_missing=skip_missing)
    keep = [i for i in range(len(paths)) if ok[i]]
    gallery = build_gallery(emb[keep], [ids[i] for i in keep], [paths[i] for i in keep],
                            model_record(embedder, model_path), kind, **params)
    gallery.params["flip_tta"] = flip_tta
    save_gallery(gallery, out_dir)
    return gallery, len(paths) - len(keep)


def expand_images(items, option: str = "IMAGE") -> list[Path]:
    """Files as given, folders expanded to their images (recursively, sorted)."""
    out: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if is_image(q))
            if not found:
                raise FacefuseError(f"{option} {p}: folder holds no images")
            out += found
        else:
            out.append(p)  # missing / non-image files are reported by the embedder, all together
    if not out:
        raise FacefuseError(f"no {option} given")
    return out


def add_to_index_folder(index_dir: str | Path, images, embedder, *, identity: str | None = None,
                        batch_size: int = 64, num_workers: int | None = None) -> tuple[Gallery, int]:
    """Enroll more images into an existing index folder without rebuilding it.

    Folders among ``images`` follow the gallery layout (one sub-folder per identity, or files named
    ``<identity>_<anything>``); single files are named that way too, unless ``identity`` is given,
    which then applies to every image. Returns the gallery and the number of images added."""
    gallery = load_gallery(index_dir, fingerprint=embedder.fingerprint, dim=embedder.dim)
    paths: list[Path] = []
    ids: list[str] = []
    for item in images:
        p = Path(item)
        if p.is_dir():
            ps, ns = scan_gallery(p)
        else:
            ps, ns = [p], [identity_from_name(p)]
        paths += ps
        ids += [identity] * len(ps) if identity else ns
    if not paths:
        raise FacefuseError("no images to add")
    emb, _ = embedder.embed_paths(paths, batch_size=batch_size, num_workers=num_workers,
                                  flip_tta=bool(gallery.params.get("flip_tta")))
    gallery.add(emb, ids, paths)
    save_gallery(gallery, index_dir)
    return gallery, len(paths)


def search_images(images, index_dir: str | Path, embedder, *, top_k: int = 5,
                  threshold: float | None = None, batch_size: int = 64, num_workers: int | None = None,
                  nprobe: int | None = None, ef_search: int | None = None, far: float | None = None) -> list[dict]:
    """Identify each query image (folders expanded) against the gallery in one batched call.
    Each result is :func:`index.gallery.search_gallery`'s dict plus the query ``path`` and the
    ``threshold`` below which the answer is ``unknown``: ``threshold`` if given, else the model's
    calibrated one (at ``far``; :func:`index.calibrate.stored_threshold`), else none."""
    from facefuse.index.verify import resolve_threshold

    threshold, _ = resolve_threshold(embedder.meta, threshold, far, "the model")
    paths = expand_images(images)
    gallery = load_gallery(index_dir, fingerprint=embedder.fingerprint, dim=embedder.dim)
    emb, _ = embedder.embed_paths(paths, batch_size=batch_size, num_workers=num_workers,
                                  flip_tta=bool(gallery.params.get("flip_tta")))
    results = search_gallery(gallery, emb, top_k, threshold, nprobe=nprobe, ef_search=ef_search)
    return [{"path": str(p), **r, "threshold": threshold} for p, r in zip(paths, results)]


def index_model_path(index_dir: str | Path) -> Path:
    """The model an index folder was built with (for ``search`` without ``--model``)."""
    path = read_meta(index_dir).get("model", {}).get("path")
    if not path or not Path(path).exists():
        raise FacefuseError(f"{index_dir}: the model it was built with ({path}) is not there; pass --model")
    return Path(path)
