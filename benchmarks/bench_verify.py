"""`verify` end to end on LFW pairs.txt vs the embedding throughput bound.

The bound is ``unique images / model throughput``: the time the model alone needs to embed every
distinct image once (throughput measured by ``Embedder.embed_tensor`` on in-memory batches of the
same size). ``verify`` adds reading the pairs file, decoding and resizing every image (in
DataLoader workers, overlapped with the model), the cosines and the metrics; the ratio
``total / bound`` says how much that costs (target <= 1.2).

    python benchmarks/bench_verify.py --model runs/r18/model.onnx
    python benchmarks/bench_verify.py                       # random-weights mobilenetv2, exported to ONNX

Both the in-process library call (``index.verify.verify_pairs``) and, with ``--cli``, the full
``facefuse verify`` command in a fresh interpreter (imports and model loading included) are timed.
Writes benchmarks/results/verify-<device>.json.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import device_name, print_table, write_results  # noqa: E402

COLUMNS = ["model", "images", "pairs", "model_img_s", "bound_s", "verify_s", "ratio", "cli_s", "roc_auc",
           "kfold_accuracy"]


def parse_args(argv):
    from facefuse.core.paths import lfw_dir

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="an .onnx file or a facefuse checkpoint / run folder (default: random weights)")
    p.add_argument("--backbone", default="mobilenetv2", help="backbone of the random-weights model")
    p.add_argument("--runtime", choices=["onnx", "torch"], default="onnx", help="for the random-weights model")
    p.add_argument("--pairs", default=str(lfw_dir() / "pairs.txt"))
    p.add_argument("--root", default=str(lfw_dir() / "lfw-112"))
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=None, help="decoding workers (default: min(4, cores))")
    p.add_argument("--min-time", type=float, default=10.0, help="seconds of throughput measurement")
    p.add_argument("--cli", action="store_true", help="also time `python -m facefuse.cli verify` in a subprocess")
    return p.parse_args(argv)


def random_model(backbone: str, runtime: str, folder: Path) -> Path:
    import torch

    from facefuse.export.onnx_export import export_onnx
    from facefuse.trainer.checkpoint import ModelMeta, save_model_file
    from facefuse.trainer.config import ModelConfig
    from facefuse.trainer.model import build_model

    cfg = ModelConfig(backbone=backbone)
    torch.manual_seed(0)
    model = build_model(cfg, 2).eval()
    ckpt = folder / "model.pt"
    save_model_file(ckpt, model, ModelMeta.for_model(cfg, model, 2, (0.5,) * 3, (0.5,) * 3))
    if runtime == "torch":
        return ckpt
    export_onnx(ckpt, folder / "model.onnx")
    return folder / "model.onnx"


def model_throughput(embedder, batch_size: int, min_time: float) -> float:
    import torch

    s = embedder.meta.image_size
    x = torch.randn(batch_size, 3, s, s)
    embedder.embed_tensor(x)  # warm-up
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < min_time:
        embedder.embed_tensor(x)
        n += 1
    return n * batch_size / (time.perf_counter() - t0)


def main(argv=None):
    args = parse_args(argv)
    import torch

    from facefuse.export.runtime import load_embedder
    from facefuse.core.pairs import read_pairs
    from facefuse.index.verify import verify_pairs

    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else random_model(args.backbone, args.runtime, Path(tmp))
        embedder = load_embedder(model)
        pairs = read_pairs(args.pairs, root=args.root)
        n_images = len(pairs.unique_paths()[0])
        rate = model_throughput(embedder, args.batch_size, args.min_time)
        t0 = time.perf_counter()
        result = verify_pairs(pairs, embedder, batch_size=args.batch_size, num_workers=args.workers)
        verify_s = time.perf_counter() - t0
        cli_s = None
        if args.cli:
            cmd = [sys.executable, "-m", "facefuse.cli", "verify", args.pairs, "--model", str(model),
                   "--root", args.root, "--batch-size", str(args.batch_size), "--json"]
            if args.workers is not None:
                cmd += ["--workers", str(args.workers)]
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True)
            cli_s = time.perf_counter() - t0
    bound = n_images / rate
    m = result.metrics or {}
    row = {"model": args.model or f"random {args.backbone} ({args.runtime})", "runtime": embedder.runtime,
           "images": n_images, "pairs": len(pairs), "model_img_s": rate, "bound_s": bound,
           "verify_s": verify_s, "ratio": verify_s / bound, "cli_s": cli_s,
           "roc_auc": m.get("roc_auc"), "kfold_accuracy": m.get("kfold_accuracy")}
    print_table([row], COLUMNS)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    settings = dict(vars(args), torch_threads=torch.get_num_threads())
    path = write_results("verify", device_name(device), settings, [row])
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
