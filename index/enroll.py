"""Image folders (or precomputed embeddings) in, gallery folders out: what ``facefuse index
build|add`` and ``facefuse search`` do, as functions over an :class:`export.runtime.Embedder`.
A gallery keeps the :class:`core.settings.EmbedSettings` its rows were made with; adds and searches
embed alike.

Precomputed embeddings (``embeddings``) are a float ``.npy`` of shape ``(n, d)``, or a folder of
such shards read in file-name order (name them so that order is right: ``part-00000.npy``, ...);
they are memory-mapped, checked to be finite, and normalised and indexed in chunks. Their labels
(``labels``), one per row in the same order, are one of:

``.txt``   one identity per line (no image paths);
``.json``  a list of identities, or ``{"identities": [...], "paths": [...]}`` (paths optional);
``.npy``   a string array of identities ``(n,)``, or of ``(identity, path)`` rows ``(n, 2)``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from facefuse.core.errors import FacefuseError, ParameterError
from facefuse.core.settings import EmbedSettings, settings_mismatch
from facefuse.index.gallery import (Gallery, build_gallery, check_model, identity_from_name, load_gallery,
                                    read_meta, save_gallery, scan_gallery, search_gallery, update_gallery)


def model_record(embedder, model_path: str | Path) -> dict:
    """What a gallery remembers of the model its vectors came from."""
    return {"fingerprint": embedder.fingerprint, "embedding_dim": embedder.dim,
            "backbone": embedder.meta.backbone, "path": str(Path(model_path).resolve())}


def gallery_settings(meta: dict) -> EmbedSettings:
    """The settings a gallery's rows were embedded with, so adds and searches embed alike: its
    ``settings`` record, or the ``flip_tta`` / ``detect`` parameters of galleries written before it."""
    if isinstance(meta.get("settings"), dict) and meta["settings"]:
        return EmbedSettings.from_record({"settings": meta["settings"]})
    return EmbedSettings.from_record(meta.get("params") or {})


def build_index_folder(gallery_dir: str | Path, embedder, model_path: str | Path, out_dir: str | Path,
                       settings: EmbedSettings = EmbedSettings(), *, kind: str = "auto",
                       **params) -> tuple[Gallery, int]:
    """Embed every image of ``gallery_dir`` under ``settings`` and write the index folder ``out_dir``
    (which keeps ``settings`` for later adds and searches). Returns the gallery and the number of
    images skipped (only with ``settings.skip_missing``)."""
    paths, ids = scan_gallery(gallery_dir)
    emb, ok = embedder.embed_paths(paths, settings)
    keep = [i for i in range(len(paths)) if ok[i]]
    gallery = build_gallery(emb[keep], [ids[i] for i in keep], [paths[i] for i in keep],
                            model_record(embedder, model_path), kind, **params)
    gallery.settings = settings.to_dict()
    save_gallery(gallery, out_dir)
    return gallery, len(paths) - len(keep)


def expand_images(items, option: str = "IMAGE") -> list[Path]:
    """Files as given, folders expanded to their images (recursively, sorted)."""
    from facefuse.core.folders import images_under

    out: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = images_under(p)
            if not found:
                raise FacefuseError(f"{option} {p}: folder holds no images")
            out += found
        else:
            out.append(p)  # missing / non-image files are reported by the embedder, all together
    if not out:
        raise FacefuseError(f"no {option} given")
    return out


def add_to_index_folder(index_dir: str | Path, images, embedder, *, identity: str | None = None,
                        batch_size: int | None = None, workers: int | None = None) -> tuple[Gallery, int]:
    """Enroll more images into an existing index folder without rebuilding it, embedded with the
    gallery's own settings (``batch_size`` / ``workers`` only change how the work is done).

    Folders among ``images`` follow the gallery layout (one sub-folder per identity, or files named
    ``<identity>_<anything>``); single files are named that way too, unless ``identity`` is given,
    which then applies to every image. Returns the gallery and the number of images added."""
    index_dir = Path(index_dir)
    meta = read_meta(index_dir)
    check_model(meta, index_dir, fingerprint=embedder.fingerprint, dim=embedder.dim)
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
        raise ParameterError("images", list(images), "no images to add")
    settings = gallery_settings(meta).replace(batch_size=batch_size, workers=workers, skip_missing=False)
    emb, _ = embedder.embed_paths(paths, settings)
    with update_gallery(index_dir, fingerprint=embedder.fingerprint, dim=embedder.dim) as gallery:
        gallery.add(emb, ids, paths)
    return gallery, len(paths)


# ---------------------------------------------------------------- precomputed embeddings


class ShardedRows:
    """Rows of several memory-mapped ``.npy`` files read as one ``(n, d)`` array, in file order.
    Supports ``len``, ``shape`` and indexing by a slice or an array of row numbers."""

    def __init__(self, arrays: list[np.ndarray]):
        self.arrays = arrays
        self.offsets = np.cumsum([0] + [len(a) for a in arrays])
        self.shape = (int(self.offsets[-1]), arrays[0].shape[1])
        self.ndim = 2

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        rows = np.arange(len(self))[key] if isinstance(key, slice) else np.asarray(key)
        which = np.searchsorted(self.offsets, rows, side="right") - 1
        out = np.empty((len(rows), self.shape[1]), np.float32)
        for s in np.unique(which):
            m = which == s
            out[m] = self.arrays[s][rows[m] - self.offsets[s]]
        return out


def _load_npy(path: Path) -> np.ndarray:
    try:
        x = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise FacefuseError(f"{path}: not a readable .npy array ({str(exc).splitlines()[0]})") from None
    if x.ndim != 2 or x.shape[0] == 0 or not np.issubdtype(x.dtype, np.floating):
        raise FacefuseError(f"{path}: expected a non-empty 2-D float array of embeddings, got {x.dtype} {x.shape}")
    return x


def load_embeddings(path: str | Path, chunk: int = 65_536):
    """Memory-mapped embeddings of a ``.npy`` file or a folder of ``.npy`` shards (file-name order),
    checked: 2-D float, one dimension across shards, every value finite."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix == ".npy" and not p.name.startswith("."))
        if not files:
            raise ParameterError("embeddings", path, "folder holds no .npy shards")
        arrays = [_load_npy(f) for f in files]
        for f, a in zip(files, arrays):
            if a.shape[1] != arrays[0].shape[1]:
                raise FacefuseError(f"{f}: {a.shape[1]}-d embeddings, but {files[0].name} holds {arrays[0].shape[1]}-d")
    elif path.is_file():
        files, arrays = [path], [_load_npy(path)]
    else:
        raise ParameterError("embeddings", path, "no such file or folder")
    for f, a in zip(files, arrays):
        for s in range(0, len(a), chunk):
            bad = ~np.isfinite(a[s:s + chunk]).all(1)
            if bad.any():
                raise FacefuseError(f"{f}: row {s + int(np.argmax(bad))} holds a non-finite value (nan or inf)")
    return arrays[0] if len(arrays) == 1 else ShardedRows(arrays)


def read_labels(path: str | Path, n: int, source: str | Path = "the embeddings") -> tuple[list[str], list[str]]:
    """``(identities, paths)`` of ``n`` embedding rows from a labels file (formats: module
    docstring; paths are ``""`` where the file gives none)."""
    path = Path(path)
    if not path.is_file():
        raise ParameterError("labels", path, "no such file")
    paths = None
    try:
        if path.suffix == ".npy":
            a = np.load(path, allow_pickle=False)
            if a.dtype.kind not in "US" or a.ndim not in (1, 2) or (a.ndim == 2 and a.shape[1] != 2):
                raise ValueError(f"expected a string array (n,) or (n, 2), got {a.dtype} {a.shape}")
            ids = [str(v) for v in (a if a.ndim == 1 else a[:, 0])]
            paths = None if a.ndim == 1 else [str(v) for v in a[:, 1]]
        elif path.suffix == ".json":
            doc = json.loads(path.read_text(encoding="utf-8-sig"))
            if isinstance(doc, dict):
                ids, paths = doc.get("identities"), doc.get("paths")
            else:
                ids = doc
            if not isinstance(ids, list) or not all(isinstance(v, str) for v in ids + (paths or [])):
                raise ValueError('expected a list of identities or {"identities": [...], "paths": [...]} of strings')
        else:
            ids = path.read_text(encoding="utf-8-sig").splitlines()
            empty = [i + 1 for i, v in enumerate(ids) if not v.strip()]
            if empty:
                raise ValueError(f"line {empty[0]} is empty (one identity per line)")
    except (ValueError, UnicodeDecodeError, OSError) as exc:
        raise ParameterError("labels", path, str(exc).splitlines()[0]) from None
    if len(ids) != n or (paths is not None and len(paths) != n):
        got = len(ids) if len(ids) != n else len(paths)
        raise ParameterError("labels", path, f"{got} labels/paths for {n} embedding rows in {source}")
    return ids, paths if paths is not None else [""] * n


def _embeddings_and_labels(embeddings, labels):
    """``(rows, identities, paths, settings)``: ``settings`` are those a `facefuse embed` folder was
    made with (None for a bare array: unknown)."""
    if labels is None:  # a `facefuse embed` output folder: shards in global order with its labels and paths
        from facefuse.export.extract import embed_folder_settings, read_embed_folder

        x, ids, paths = read_embed_folder(embeddings)
        return x, ids, paths, embed_folder_settings(embeddings)
    x = load_embeddings(embeddings)
    ids, paths = read_labels(labels, len(x), embeddings)
    return x, ids, paths, None


def build_index_folder_from_embeddings(embeddings: str | Path, labels: str | Path | None, out_dir: str | Path, *,
                                       model: dict | None = None, kind: str = "auto", **params) -> Gallery:
    """Index precomputed ``embeddings`` with their ``labels`` into ``out_dir`` (no images read;
    ``labels`` None: ``embeddings`` is a `facefuse embed` folder, which carries them). ``model`` is the
    record of the model that made them (:func:`model_record`), if known."""
    x, ids, paths, settings = _embeddings_and_labels(embeddings, labels)
    if model is not None and model.get("embedding_dim") not in (None, x.shape[1]):
        raise ParameterError("embeddings", embeddings, f"{x.shape[1]}-d rows but the model makes "
                             f"{model['embedding_dim']}-d embeddings")
    model = model or {"fingerprint": None, "embedding_dim": int(x.shape[1]), "backbone": None, "path": None}
    gallery = build_gallery(x, ids, paths, model, kind, **params)
    gallery.settings = (settings or EmbedSettings()).to_dict()  # image adds and searches embed as the rows were made
    save_gallery(gallery, out_dir)
    return gallery


def add_embeddings_to_index_folder(index_dir: str | Path, embeddings: str | Path,
                                   labels: str | Path | None) -> tuple[Gallery, int]:
    """Enroll precomputed ``embeddings`` with their ``labels`` into an existing index folder."""
    index_dir = Path(index_dir)
    meta = read_meta(index_dir)
    x, ids, paths, settings = _embeddings_and_labels(embeddings, labels)
    if x.shape[1] != meta.get("dim"):
        raise ParameterError("embeddings", embeddings, f"{x.shape[1]}-d rows but {index_dir} holds "
                             f"{meta.get('dim')}-d embeddings")
    why = settings_mismatch(settings, gallery_settings(meta), uses=f"{index_dir} embeds with") if settings else None
    if why:
        raise ParameterError("embeddings", embeddings, f"{why}; embed again with the index's settings")
    with update_gallery(index_dir) as gallery:
        gallery.add(x, ids, paths)
    return gallery, len(x)


def search_images(images, index_dir: str | Path, embedder, *, top_k: int = 5, threshold: float | None = None,
                  far: float | None = None, nprobe: int | None = None, ef_search: int | None = None,
                  batch_size: int | None = None, workers: int | None = None,
                  align: str | None = None) -> list[dict]:
    """Identify each query image (folders expanded) against the gallery in one batched call, the
    queries embedded with the gallery's own settings (``align``: another alignment for the queries,
    e.g. ``landmarks`` for photos against a gallery of template crops). Each result is
    :func:`index.gallery.search_gallery`'s dict plus the query ``path`` and the ``threshold`` below
    which the answer is ``unknown``: ``threshold`` if given, else the model's calibrated one (at
    ``far``; :func:`verification.thresholds.stored_threshold`), else none. A calibrated threshold
    made under other settings than the index's adds a ``note`` to each."""
    from facefuse.verification.thresholds import calibration_mismatch, resolve_threshold

    given = threshold is not None
    threshold, _ = resolve_threshold(embedder.meta, threshold, far, "the model")
    paths = expand_images(images)
    gallery = load_gallery(index_dir, fingerprint=embedder.fingerprint, dim=embedder.dim)
    settings = gallery_settings({"settings": getattr(gallery, "settings", None), "params": gallery.params})
    settings = settings.replace(batch_size=batch_size, workers=workers, skip_missing=False, align=align)
    note = calibration_mismatch(embedder.meta, settings) if threshold is not None and not given else None
    emb, _ = embedder.embed_paths(paths, settings)
    results = search_gallery(gallery, emb, top_k, threshold, nprobe=nprobe, ef_search=ef_search)
    return [{"path": str(p), **r, "threshold": threshold, **({"note": note} if note else {})}
            for p, r in zip(paths, results)]


def index_model_path(index_dir: str | Path) -> Path:
    """The model an index folder was built with (for ``search`` without a model)."""
    path = read_meta(index_dir).get("model", {}).get("path")
    if not path:
        raise FacefuseError(f"{index_dir}: built from embeddings without a model; pass model=")
    if not Path(path).exists():
        raise FacefuseError(f"{index_dir}: the model it was built with ({path}) is not there; pass model=")
    return Path(path)
