"""Embedding throughput: PyTorch eager vs ONNX Runtime, per backbone and batch size.

Each backbone is built with random weights (throughput does not depend on them), saved as a
facefuse model file, exported with ``export.onnx_export.export_onnx`` (which also checks parity),
and both runtimes are timed through the same ``Embedder.embed_tensor`` call that ``verify`` and
``search`` use (host batch in, L2-normalised float32 numpy out). Images/s is the median over
``--repeats`` timed windows of at least ``--min-time`` seconds each.

    python benchmarks/bench_embed.py                                   # all backbones, 112 px, batch 1/32/128
    python benchmarks/bench_embed.py --backbones resnet18 mobilenetv2 --batches 32

On a GPU the eager model runs with the Triton kernel backend and ORT with the CUDA provider.
Writes benchmarks/results/embed-<device>.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from benchmarks.common import device_name, print_table, write_results  # noqa: E402

DEFAULT_BACKBONES = ["resnet18", "resnet34", "resnet50", "mobilenetv2", "convnext_atto", "convnext_nano",
                     "convnext_pico", "convnext_t"]
COLUMNS = ["backbone", "batch", "eager_img_s", "ort_img_s", "ort_vs_eager", "exporter", "min_cosine"]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbones", nargs="+", default=DEFAULT_BACKBONES)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32, 128])
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--embedding-dim", type=int, default=512)
    p.add_argument("--min-time", type=float, default=2.0, help="seconds per timed window")
    p.add_argument("--repeats", type=int, default=3, help="timed windows per case (median reported)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    return p.parse_args(argv)


def throughput(fn, batch: int, min_time: float, repeats: int) -> float:
    """Median images/s over ``repeats`` windows of >= ``min_time`` s (one window when a single
    call already takes longer than ``min_time``: large batches of large models)."""
    t0 = time.perf_counter()
    fn()  # warm-up (allocations, ORT arena, cudnn autotune)
    if time.perf_counter() - t0 > min_time:
        repeats = 1
    rates = []
    for _ in range(repeats):
        n, t0 = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            dt = time.perf_counter() - t0
            if dt >= min_time:
                break
        rates.append(n * batch / dt)
    return float(np.median(rates))


def make_model(backbone: str, args, folder: Path) -> Path:
    import torch

    from facefuse.trainer.checkpoint import ModelMeta, save_model_file
    from facefuse.trainer.config import ModelConfig
    from facefuse.trainer.model import build_model

    cfg = ModelConfig(backbone=backbone, embedding_dim=args.embedding_dim, image_size=args.image_size)
    torch.manual_seed(0)
    model = build_model(cfg, 2).eval()
    path = folder / f"{backbone}.pt"
    save_model_file(path, model, ModelMeta.for_model(cfg, model, 2, (0.5,) * 3, (0.5,) * 3))
    return path


def main(argv=None):
    args = parse_args(argv)
    import torch

    from facefuse.export.onnx_export import export_onnx
    from facefuse.export.runtime import OnnxEmbedder, TorchEmbedder

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for backbone in args.backbones:
            ckpt = make_model(backbone, args, Path(tmp))
            onnx_path = Path(tmp) / f"{backbone}.onnx"
            t = time.perf_counter()
            rep = export_onnx(ckpt, onnx_path)
            export_s = time.perf_counter() - t
            eager = TorchEmbedder(ckpt, device=device)
            ort = OnnxEmbedder(onnx_path)
            for b in args.batches:
                x = torch.randn(b, 3, args.image_size, args.image_size)
                e = throughput(lambda: eager.embed_tensor(x), b, args.min_time, args.repeats)
                o = throughput(lambda: ort.embed_tensor(x), b, args.min_time, args.repeats)
                row = {"backbone": backbone, "batch": b, "image_size": args.image_size, "eager_img_s": e,
                       "ort_img_s": o, "ort_vs_eager": o / e, "exporter": rep.exporter, "export_s": export_s,
                       "min_cosine": rep.min_cosine, "eager_device": str(eager.device),
                       "ort_provider": ort.session.get_providers()[0]}
                print_table([row], COLUMNS)
                results.append(row)
    print("\nall cases:")
    print_table(results, COLUMNS)
    settings = dict(vars(args), torch_threads=torch.get_num_threads())
    path = write_results("embed", device_name(device), settings, results)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
