"""Export a facefuse embedding model to ONNX and check the file against PyTorch.

The graph maps ``input`` (B x 3 x S x S float32, preprocessed as the metadata says) to
``embedding`` (B x D float32, not normalised), with a dynamic batch axis. ``--fp16`` computes in
float16 inside the graph but keeps float32 inputs and outputs. The preprocessing contract
(``facefuse.image_size``, ``mean``, ``std``, ``channel_order``, ``embedding_dim``,
``fingerprint``, ``backbone``, plus ``exporter`` and ``dtype``) is stored in the model's
``metadata_props``, so :class:`export.runtime.OnnxEmbedder` needs nothing else. A calibrated
checkpoint's decision thresholds (``index.calibrate``) travel as ``facefuse.thresholds`` (JSON).

The torch.export based exporter (``dynamo=True``) is tried first; if it fails, the TorchScript
exporter is used and the report says so and why. Before the file is moved into place it must pass
``onnx.checker`` and a parity check: ONNX Runtime vs PyTorch (float32, pure-PyTorch kernels) on a
few real images, every embedding's cosine with its reference at least ``0.9999`` (``0.995`` for
fp16), at batch size 1 and at the full check batch.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from facefuse.export.runtime import OnnxEmbedder, meta_to_props, onnx_providers
from facefuse.core.errors import FacefuseError, ParameterError
from facefuse.core.files import atomic_path
from facefuse.core.folders import images_under
from facefuse.core.images import eval_transform, open_rgb
from facefuse.core.paths import lfw_dir

MIN_COSINE = {"float32": 0.9999, "float16": 0.995}
EXPORTERS = ("auto", "dynamo", "torchscript")


@dataclass
class ExportReport:
    path: Path
    exporter: str                 # "dynamo" or "torchscript"
    fallback_reason: str | None   # why dynamo was not used (when it was tried and failed)
    opset: int
    dtype: str                    # "float32" or "float16" compute
    check_source: str             # where the parity images came from
    n_check: int
    min_cosine: float
    max_abs_diff: float
    required_cosine: float
    providers: list[str]
    thresholds: list = None       # the calibrated FAR entries carried over from the checkpoint


class _ExportWrapper(nn.Module):
    """``input`` -> ``embedding`` with float32 at both ends; the network may compute in fp16."""

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.model = model.to(dtype)
        self.dtype = dtype

    def forward(self, x):
        return self.model(x.to(self.dtype)).float()


def export_onnx(checkpoint: str | Path, out: str | Path, *, fp16: bool = False, opset: int | None = None,
                check_images: str | Path | None = None, exporter: str = "auto",
                n_check: int = 8) -> ExportReport:
    """Export ``checkpoint`` (model file, training checkpoint or run folder) to ``out``."""
    from facefuse.trainer.checkpoint import load_embedding_model

    if exporter not in EXPORTERS:
        raise ValueError(f"unknown exporter {exporter!r}; valid: {', '.join(EXPORTERS)}")
    out = Path(out)
    if out.is_dir():
        raise ParameterError("out", out, "is a folder; give a file name like model.onnx")
    reference, meta = load_embedding_model(checkpoint, "cpu")
    reference.set_kernel_backend("torch")
    model, _ = load_embedding_model(checkpoint, "cpu")
    model.set_kernel_backend("torch")
    dtype = "float16" if fp16 else "float32"
    wrapper = _ExportWrapper(model, torch.float16 if fp16 else torch.float32).eval()
    batch, source = check_batch(meta, check_images, n_check)
    with atomic_path(out) as tmp:
        used, reason = _export(wrapper, meta.image_size, tmp, opset, exporter)
        opset_used = _finish(tmp, meta_to_props(meta, exporter=used, dtype=dtype))
        min_cos, max_abs, providers = _parity(reference, tmp, batch)
        need = MIN_COSINE[dtype]
        if not min_cos >= need:
            raise FacefuseError(f"export check failed: ONNX Runtime vs PyTorch cosine {min_cos:.6f} < {need} "
                                f"on {len(batch)} images ({source}); nothing written")
    return ExportReport(out, used, reason, opset_used, dtype, source, len(batch), min_cos, max_abs,
                        need, providers, (meta.thresholds or {}).get("at_far", []))


def _export(wrapper: nn.Module, size: int, path: Path, opset: int | None, exporter: str):
    x = torch.randn(2, 3, size, size)
    reason = None
    if exporter in ("auto", "dynamo"):
        try:
            with quiet():
                torch.onnx.export(wrapper, (x,), str(path), dynamo=True, input_names=["input"],
                                  output_names=["embedding"], opset_version=opset, verbose=False,
                                  dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, external_data=False)
            return "dynamo", None
        except Exception as exc:  # any exporter failure falls back, and the reason is reported
            if exporter == "dynamo":
                raise FacefuseError(f"dynamo ONNX export failed: {_first_line(exc)}") from None
            reason = f"{type(exc).__name__}: {_first_line(exc)}"
    with quiet():
        torch.onnx.export(wrapper, (x,), str(path), dynamo=False, input_names=["input"],
                          output_names=["embedding"], opset_version=opset or 17,
                          dynamic_axes={"input": {0: "batch"}, "embedding": {0: "batch"}})
    return "torchscript", reason


def _finish(path: Path, props: dict[str, str]) -> int:
    """Add metadata, run the checker, save in place; returns the default-domain opset."""
    import onnx

    model = onnx.load(str(path))
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, props)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _parity(reference: nn.Module, path: Path, batch: torch.Tensor):
    with torch.inference_mode():
        ref = reference(batch).double().numpy()
    providers = onnx_providers()
    sess = OnnxEmbedder(path, providers=providers)
    full = sess.embed_tensor(batch, normalize=False).astype(np.float64)
    one = sess.embed_tensor(batch[:1], normalize=False).astype(np.float64)
    got = np.concatenate([full, one])
    want = np.concatenate([ref, ref[:1]])
    cos = np.sum(got * want, 1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    return float(cos.min()), float(np.abs(got - want).max()), sess.session.get_providers()


def check_batch(meta, folder: str | Path | None, n: int) -> tuple[torch.Tensor, str]:
    """Up to ``n`` preprocessed images: from ``folder`` if given, else the shared LFW data, else
    synthetic smooth random images (seeded). Returns the batch and a description of its source."""
    tf = eval_transform(meta.image_size, meta.mean, meta.std)
    if folder is not None:
        paths = _images_in(Path(folder), n)
        if not paths:
            raise FacefuseError(f"{folder}: no images to check the export with")
        source = f"{len(paths)} images from {folder}"
    else:
        paths = _images_in(lfw_dir() / "lfw-112", n)
        source = f"{len(paths)} LFW images"
    if paths:
        batch = torch.stack([tf(open_rgb(p)) for p in paths])
    else:
        batch = torch.stack([tf(im) for im in _synthetic_images(n, meta.image_size)])
        source = f"{n} synthetic images (no image folder given, no shared LFW data)"
    if meta.channel_order.upper() == "BGR":
        batch = batch.flip(1)
    return batch, source


def _images_in(folder: Path, n: int) -> list[Path]:
    if not folder.is_dir():
        return []
    return images_under(folder)[:n]


def _synthetic_images(n: int, size: int):
    from PIL import Image

    rng = np.random.default_rng(0)
    for _ in range(n):
        low = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        yield Image.fromarray(low).resize((size, size), Image.BICUBIC)


@contextlib.contextmanager
def quiet():
    """Silence what exporters and ORT's quantizer print (progress on stdout, warnings); the CLI
    prints its own summary."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _first_line(exc: BaseException) -> str:
    s = str(exc).strip()
    return s.splitlines()[0][:200] if s else type(exc).__name__
