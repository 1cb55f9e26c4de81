"""One embedding interface over two runtimes: an exported ONNX file (ONNX Runtime) or a facefuse
checkpoint / run folder (PyTorch).

Both read the preprocessing contract (input size, mean, std, channel order) from the model itself
(ONNX ``metadata_props`` written by :mod:`export.onnx_export`, or the checkpoint's
:class:`~trainer.checkpoint.ModelMeta`), so an image is always fed the way the model was trained.

Embeddings returned to callers are float32 numpy arrays, L2-normalised row by row.
"""

from __future__ import annotations

import functools
import json
import os
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np
import torch

from facefuse.core.embed import embed_batch_tta, embed_paths, l2_normalize
from facefuse.core.errors import FacefuseError, ParameterError
from facefuse.core.images import eval_transform
from facefuse.core.meta import ModelMeta
from facefuse.core.settings import EmbedSettings

META_PREFIX = "facefuse."


class Embedder(ABC):
    """Images in, L2-normalised embeddings out. ``meta`` describes the model and its inputs; how the
    images are read (alignment, flip, batching) is an :class:`~core.settings.EmbedSettings` passed to
    each call, never state of the embedder."""

    meta: ModelMeta
    runtime: str  # "onnxruntime" or "pytorch"

    @abstractmethod
    def _run(self, x: torch.Tensor) -> np.ndarray:
        """Raw (unnormalised) embeddings, float32 B x D, for a normalised float32 B x 3 x S x S batch."""

    @property
    def dim(self) -> int:
        return self.meta.embedding_dim

    @property
    def fingerprint(self) -> str:
        return self.meta.fingerprint

    def transform(self, settings: EmbedSettings = EmbedSettings(), count_faces: bool = False):
        """PIL RGB image -> model input tensor 3 x S x S: the face alignment of ``settings.align``
        (:func:`face_step`), then the model's resize and normalisation (channel order applied).
        ``count_faces``: the transform returns ``(tensor, faces found)`` when it aligns."""
        base = eval_transform(self.meta.image_size, self.meta.mean, self.meta.std)
        if self.meta.channel_order.upper() == "BGR":
            base = _Then(base, _flip_channels)
        step = face_step(settings.align, self.meta.image_size)
        if step is None:
            return base
        return _Counted(step, base) if count_faces else _Then(step, base)

    def embed_tensor(self, x, *, flip: bool = False, normalize: bool = True) -> np.ndarray:
        """Embed a preprocessed batch (B x 3 x S x S, any float dtype, numpy or torch).

        With ``flip`` the embedding is ``e(x) + e(mirror(x))``. ``normalize=False`` returns the
        raw model output (what export parity compares)."""
        x = torch.as_tensor(x).float()
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected a B x 3 x H x W batch, got shape {tuple(x.shape)}")
        e = embed_batch_tta(self._run, x, flip)
        return l2_normalize(e) if normalize else e

    def embed_paths(self, paths, settings: EmbedSettings = EmbedSettings(), *, where: dict | None = None,
                    progress=None, found: dict | None = None, **changes) -> tuple[np.ndarray, np.ndarray]:
        """Embed image files with this model under ``settings`` (``changes`` override its fields,
        e.g. ``workers=0``): :func:`facefuse.core.embed.embed_paths`. ``found``: filled with the faces
        the alignment step saw per image index (with ``align`` other than ``none``)."""
        settings = settings.replace(**changes)
        transform = self.transform(settings, count_faces=found is not None)
        return embed_paths(self._run, paths, transform, dim=self.dim, settings=settings, where=where,
                           progress=progress, found=found)


def face_step(align: str, size: int = 112):
    """The PIL -> PIL step that brings a photo's face to the template before the resize, for an
    :class:`EmbedSettings` ``align``: None for ``none``."""
    if align == "none":
        return None
    if align == "haar":
        from facefuse.core.facecrop import HaarFaceCrop

        return HaarFaceCrop()
    if align != "landmarks":
        raise ParameterError("align", align, "not an alignment step (auto is resolved by a model first)")
    return landmark_aligner(size)


@functools.lru_cache(maxsize=4)
def landmark_aligner(size: int):
    """One landmark aligner per crop size in a process, so its detector loads its weights once
    (stateless otherwise; DataLoader workers get their own copy by pickling)."""
    from facefuse.align import LandmarkAlign

    return LandmarkAlign(size=size)


def _flip_channels(t: torch.Tensor) -> torch.Tensor:
    return t.flip(0)


class _Counted:
    """``(then(step(image)), faces the step found)``, picklable: a landmark step reports every face
    it detected (the largest is used), the Haar crop 1 or 0."""

    def __init__(self, step, then):
        self.step, self.then = step, then

    def __call__(self, image):
        if hasattr(self.step, "align"):
            a = self.step.align(image)
            return self.then(a.image), a.n_faces
        box = self.step.box(image)
        if box is None:
            return self.then(image), 0
        return self.then(self.step.crop_face(image, box)), 1


class _Then:
    """``second(first(image))``, picklable for DataLoader workers."""

    def __init__(self, first, second):
        self.first, self.second = first, second

    def __call__(self, image):
        return self.second(self.first(image))


# ---------------------------------------------------------------- ONNX Runtime


def session_options(threads: int = 0):
    """ORT session options, chosen (``benchmarks/bench_embed.py`` measures them):

    - all graph optimisations, including the CPU's NCHWc layout (blocked convolutions with fused
      bias/activation/residual): ``ORT_ENABLE_EXTENDED`` ran ConvNeXt-atto (batch 32, 2 cores)
      at 0.42x of this, so no optimised model is saved beside the original (an NCHWc-optimised
      file is only valid on the CPU that wrote it, and optimising at load takes well under a second);
    - an explicit intra-op thread count: the cores this process may use (its affinity mask, which
      respects ``taskset`` and container limits, unlike ORT's own count), or ``threads``;
    - spinning worker threads (ORT's default, stated): turning it off cost 5-15% on 2 cores;
    - the memory arena (default), so a repeated batch shape allocates nothing."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads or len(os.sched_getaffinity(0))
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.enable_cpu_mem_arena = True
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1")
    opts.log_severity_level = 3
    return opts


def onnx_providers() -> list[str]:
    """CUDA only when torch sees a GPU (ORT lists CUDA on machines that have none)."""
    return (["CUDAExecutionProvider", "CPUExecutionProvider"] if torch.cuda.is_available()
            else ["CPUExecutionProvider"])


def meta_to_props(meta: ModelMeta, **extra) -> dict[str, str]:
    """The preprocessing contract as ONNX ``metadata_props`` (string values)."""
    d = {"image_size": meta.image_size, "mean": list(meta.mean), "std": list(meta.std),
         "channel_order": meta.channel_order, "embedding_dim": meta.embedding_dim,
         "fingerprint": meta.fingerprint, "backbone": meta.backbone,
         **({"thresholds": meta.thresholds} if meta.thresholds else {}),
         **({"alignment": meta.alignment} if meta.alignment else {}), **extra}
    return {META_PREFIX + k: v if isinstance(v, str) else json.dumps(v) for k, v in d.items()}


def meta_from_props(props: dict[str, str], where: str) -> ModelMeta:
    try:
        g = lambda k: props[META_PREFIX + k]  # noqa: E731
        return ModelMeta(backbone=g("backbone"), embedding_dim=int(g("embedding_dim")),
                         image_size=int(g("image_size")), mean=tuple(json.loads(g("mean"))),
                         std=tuple(json.loads(g("std"))), channel_order=g("channel_order"),
                         fingerprint=g("fingerprint"),
                         thresholds=json.loads(props.get(META_PREFIX + "thresholds", "{}")),
                         alignment=props.get(META_PREFIX + "alignment", ""))
    except (KeyError, ValueError) as exc:
        raise FacefuseError(f"{where}: ONNX model has no facefuse preprocessing metadata ({exc}); "
                            "export it with `facefuse export`") from None


class OnnxEmbedder(Embedder):
    runtime = "onnxruntime"

    def __init__(self, path: str | Path, *, providers: list[str] | None = None, threads: int = 0,
                 io_binding: bool | None = None):
        """``io_binding``: feed and fetch through ORT's I/O binding with torch-owned buffers on the
        session's device (no ORT-side host copies; on CUDA the batch is uploaded once by torch and
        the output stays on the GPU until the final copy). None (default): on when the session
        runs on the CUDA provider."""
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise FacefuseError(f"{path}: no such model file")
        try:
            self.session = ort.InferenceSession(str(path), session_options(threads), providers=providers or onnx_providers())
        except Exception as exc:  # ORT raises its own untyped exceptions for bad files
            first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
            raise FacefuseError(f"{path}: not a valid ONNX model ({first})") from None
        self.meta_props = dict(self.session.get_modelmeta().custom_metadata_map)  # all of it, facefuse.* and more
        self.meta = meta_from_props(self.meta_props, str(path))
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.input_dtype = np.float16 if inp.type == "tensor(float16)" else np.float32
        out = self.session.get_outputs()[0]
        self.output_name = out.name
        self.output_dtype = np.float16 if out.type == "tensor(float16)" else np.float32
        self.path = path
        on_cuda = self.session.get_providers()[0] == "CUDAExecutionProvider"
        self.io_binding = on_cuda if io_binding is None else bool(io_binding)
        self.device = torch.device("cuda", 0) if on_cuda else torch.device("cpu")

    def _run(self, x: torch.Tensor) -> np.ndarray:
        if self.io_binding:
            return self._run_bound(x)
        (e,) = self.session.run(None, {self.input_name: x.numpy().astype(self.input_dtype, copy=False)})
        return e.astype(np.float32, copy=False)

    def _run_bound(self, x: torch.Tensor) -> np.ndarray:
        """One run through ORT's I/O binding: input and output live in torch tensors on the
        session's device, bound by pointer."""
        kind = self.device.type
        dev_id = self.device.index or 0
        xin = x.to(self.device, dtype=_TORCH_DTYPE[self.input_dtype]).contiguous()
        out = torch.empty((x.shape[0], self.dim), device=self.device, dtype=_TORCH_DTYPE[self.output_dtype])
        binding = self.session.io_binding()
        binding.bind_input(self.input_name, kind, dev_id, self.input_dtype, tuple(xin.shape), xin.data_ptr())
        binding.bind_output(self.output_name, kind, dev_id, self.output_dtype, tuple(out.shape), out.data_ptr())
        self.session.run_with_iobinding(binding)
        return out.float().cpu().numpy()


_TORCH_DTYPE = {np.float16: torch.float16, np.float32: torch.float32}


# ---------------------------------------------------------------- PyTorch


class TorchEmbedder(Embedder):
    runtime = "pytorch"

    def __init__(self, path: str | Path, *, device: str | torch.device | None = None):
        from facefuse.trainer.checkpoint import load_embedding_model
        from facefuse.trainer.ops import resolve_backend

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model, self.meta = load_embedding_model(path, self.device)
        self.model.set_kernel_backend(resolve_backend("auto", self.device))
        self.path = Path(path)

    @torch.inference_mode()
    def _run(self, x: torch.Tensor) -> np.ndarray:
        return self.model(x.to(self.device)).float().cpu().numpy()


def write_thresholds(path: str | Path, thresholds: dict) -> Path:
    """Store calibrated thresholds in a model: an ONNX file's ``facefuse.thresholds`` metadata
    prop, or a checkpoint / run folder's model file (``trainer.checkpoint.set_thresholds``). The
    file is rewritten atomically, graph and weights unchanged. Returns the file written."""
    path = Path(path)
    if _is_torch_model(path):
        from facefuse.trainer.checkpoint import set_thresholds

        return set_thresholds(path, thresholds)
    import onnx

    from facefuse.core.files import atomic_path

    model = onnx.load(str(path))
    props = {p.key: p.value for p in model.metadata_props}
    props[META_PREFIX + "thresholds"] = json.dumps(thresholds)
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, props)
    with atomic_path(path) as tmp:
        onnx.save(model, str(tmp))
    return path


def load_embedder(path: str | Path, *, device: str | None = None) -> Embedder:
    """A run folder, a ``.pt``/``.pth``/``.ckpt`` file or any zip archive (torch's format) ->
    :class:`TorchEmbedder`; any other file -> :class:`OnnxEmbedder`. Each loader says clearly
    when the file is not what it expects."""
    path = Path(path)
    if not path.exists():
        raise FacefuseError(f"{path}: no such model file or run folder")
    if _is_torch_model(path):
        return TorchEmbedder(path, device=device)
    return OnnxEmbedder(path)


def _is_torch_model(path: Path) -> bool:
    """A run folder, a ``.pt``/``.pth``/``.ckpt`` file or any zip archive (torch's format)."""
    if path.is_dir() or path.suffix in (".pt", ".pth", ".ckpt"):
        return True
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"
