"""Shared shape of every benchmark results file:
``benchmarks/results/<benchmark>-<device-slug>.json`` holding
``{"benchmark", "device", "versions", "settings", "results": [...]}``."""

from __future__ import annotations

import json
import os
import platform
import re
import tempfile
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def device_name(device: str = "cuda") -> str:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"


def device_slug(name: str) -> str:
    if name.startswith("cpu"):
        return f"cpu{os.cpu_count()}"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def versions() -> dict:
    out = {"python": platform.python_version()}
    for mod in ("torch", "torchvision", "triton", "onnx", "onnxruntime", "faiss", "numpy"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception as exc:  # a missing optional package is recorded, not fatal
            out[mod] = f"unavailable ({type(exc).__name__})"
    return out


def write_results(benchmark: str, device: str, settings: dict, results: list[dict],
                  out_dir: Path = RESULTS_DIR) -> Path:
    """Write the results JSON atomically and return its path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{benchmark}-{device_slug(device)}.json"
    doc = {"benchmark": benchmark, "device": device, "versions": versions(),
           "settings": settings, "results": results}
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f, indent=2)
    os.replace(tmp, path)
    return path


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)
