"""INT8 models: ONNX Runtime static quantization of an exported float32 embedding model.

Scheme (QDQ format, what ORT's CPU and TensorRT execution providers fuse into integer kernels):
- weights int8, symmetric, per output channel; activations uint8, asymmetric, per tensor, with
  ranges calibrated on real face images (a folder; the model's own preprocessing is applied);
- only the operators that carry the arithmetic are quantized (``Conv``, ``MatMul``, ``Gemm`` by
  default); normalisation, GELU, pooling and the rest stay in float, which keeps ConvNeXt's
  LayerNorm/GELU blocks from bouncing through quantize/dequantize pairs;
- on x86 CPUs without VNNI the u8 x s8 dot products of AVX2 can saturate in 16 bits, so weights
  use 7 bits there (``reduce_range``; ``auto`` reads the CPU flags);
- the calibration images are split: three quarters calibrate, the rest (at least one) check the
  result, and the export refuses a model whose embeddings fall below ``min_cosine`` of the
  float32 model's on those held-out faces.

The output keeps the float32 model's facefuse metadata (preprocessing, fingerprint, thresholds)
with ``facefuse.dtype = int8`` and the calibration provenance added.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facefuse.core.embed import l2_normalize
from facefuse.core.errors import BadImageError, FacefuseError, ParameterError
from facefuse.core.files import atomic_path
from facefuse.core.folders import images_under
from facefuse.core.images import open_rgb
from facefuse.export.onnx_export import quiet

QUANTIZED_OPS = ("Conv", "MatMul", "Gemm")
METHODS = ("minmax", "percentile", "entropy")
MIN_COSINE = 0.95  # below this on held-out faces an INT8 export is refused
CALIB_BATCH = 16


@dataclass
class QuantReport:
    path: Path
    n_calibration: int          # images that set the activation ranges
    n_check: int                # held-out images of the cosine check
    skipped: int                # unreadable images in the folder
    min_cosine: float           # int8 vs float32 embeddings on the held-out images
    mean_cosine: float
    reduce_range: bool
    method: str
    ops: tuple[str, ...]


def has_vnni() -> bool:
    """Whether this x86 CPU has VNNI (AVX512-VNNI or AVX-VNNI) u8 x s8 dot products."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


def calibration_images(folder: str | Path, n: int) -> list[Path]:
    """Up to ``n`` image files under ``folder`` (sorted, at any depth), spread over the folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ParameterError("calib_images", folder, "no such folder")
    found = images_under(folder)
    if not found:
        raise ParameterError("calib_images", folder, "no images found")
    step = max(1, len(found) // n)
    return found[::step][:n]


def _decode(paths: list[Path], transform, folder) -> tuple[np.ndarray, int]:
    batch, skipped = [], 0
    for p in paths:
        try:
            batch.append(transform(open_rgb(p)).numpy())
        except BadImageError:
            skipped += 1
    if len(batch) < 2:
        raise ParameterError("calib_images", folder, f"{len(batch)} readable images of {len(paths)} (need at least 2)")
    return np.stack(batch).astype(np.float32), skipped


class _Reader:
    """ORT's CalibrationDataReader protocol: ``get_next()`` returns one input feed or None."""

    def __init__(self, name: str, x: np.ndarray):
        # equal batches: ORT's histogram calibrators stack the outputs of every batch
        size = min(CALIB_BATCH, len(x))
        usable = len(x) - len(x) % size
        self.feeds = iter([{name: x[i:i + size]} for i in range(0, usable, size)])

    def get_next(self):
        return next(self.feeds, None)


def quantize_int8(onnx_in: str | Path, out: str | Path, calib_images: str | Path, *, n_images: int = 256,
                  method: str = "percentile", ops=QUANTIZED_OPS, reduce_range: str | bool = "auto",
                  min_cosine: float = MIN_COSINE) -> QuantReport:
    """Quantize the float32 ONNX model ``onnx_in`` to INT8 (QDQ) at ``out``; see the module docstring."""
    from facefuse.export.runtime import OnnxEmbedder

    if method not in METHODS:
        raise ParameterError("method", method, f"unknown; valid: {', '.join(METHODS)}")
    fp32 = OnnxEmbedder(onnx_in)
    if fp32.input_dtype != np.float32 or fp32.meta_props.get("facefuse.dtype", "float32") != "float32":
        raise FacefuseError(f"{onnx_in}: quantize a float32 export (this one is {fp32.meta_props.get('facefuse.dtype')})")
    x, skipped = _decode(calibration_images(calib_images, n_images), fp32.transform(), calib_images)
    n_check = max(1, len(x) // 4)
    calib, check = x[:-n_check], x[-n_check:]
    rr = has_vnni() is False if reduce_range == "auto" else bool(reduce_range)
    out = Path(out)
    if out.is_dir():
        raise ParameterError("out", out, "is a folder; give a file name like model-int8.onnx")
    with atomic_path(out) as tmp, tempfile.TemporaryDirectory() as work, quiet():
        _quantize(Path(onnx_in), Path(tmp), Path(work), _Reader(fp32.input_name, calib), method, tuple(ops), rr)
        _copy_metadata(fp32.meta_props, Path(tmp), {"dtype": "int8", "quantization": {
            "format": "QDQ", "weights": "int8 per-channel symmetric" + (" (7-bit range)" if rr else ""),
            "activations": "uint8 per-tensor", "method": method, "ops": list(ops),
            "calibration_images": len(calib), "calibration_source": Path(calib_images).name}})
        cos = _cosines(fp32, OnnxEmbedder(tmp), check)
        if not cos.min() >= min_cosine:
            raise FacefuseError(f"INT8 check failed: embedding cosine with float32 min {cos.min():.4f} < {min_cosine} "
                                f"on {len(check)} held-out images; nothing written")
    return QuantReport(out, len(calib), len(check), skipped, float(cos.min()), float(cos.mean()), rr, method,
                       tuple(ops))


def _quantize(src: Path, dst: Path, work: Path, reader, method: str, ops: tuple, reduce_range: bool) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = work / "pre.onnx"
    try:
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=False)
    except Exception:  # noqa: BLE001 - symbolic shape inference fails on some graphs; ORT's own then suffices
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
    calibrate = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                 "entropy": CalibrationMethod.Entropy}[method]
    quantize_static(str(pre), str(dst), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                    reduce_range=reduce_range, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    op_types_to_quantize=list(ops), calibrate_method=calibrate,
                    extra_options={"ActivationSymmetric": False, "WeightSymmetric": True,
                                   "CalibPercentile": 99.99, "CalibTensorRangeSymmetric": False})


def _copy_metadata(props: dict[str, str], path: Path, extra: dict) -> None:
    import onnx

    model = onnx.load(str(path))
    merged = dict(props)
    merged.update({f"facefuse.{k}": v if isinstance(v, str) else json.dumps(v) for k, v in extra.items()})
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, merged)
    onnx.save(model, str(path))


def _cosines(a, b, x: np.ndarray) -> np.ndarray:
    ea, eb = l2_normalize(a.embed_tensor(x, normalize=False)), l2_normalize(b.embed_tensor(x, normalize=False))
    return np.sum(ea * eb, axis=1)
