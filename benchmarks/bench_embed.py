"""Embedding throughput: PyTorch eager vs ONNX Runtime, per backbone and batch size.

Each backbone is built with random weights (throughput does not depend on them), saved as a
facefuse model file and exported with ``export.onnx_export.export_onnx`` (which also checks
parity). Each runtime then lives in its own worker process (its own heap, thread pool and
allocator), timed through the same ``Embedder.embed_tensor`` call that ``verify`` and ``search``
use (host batch in, L2-normalised float32 numpy out). The parent alternates the two workers
window by window (``--repeats`` rounds of one ``--min-time`` window each, the order flipped every
round), so a slow spell of the machine hits both; a row reports each runtime's median images/s
and the median of the per-round ratios, with the ratio's range. Only one worker runs at a time.

Rows below ``--target`` (ORT / eager) get ORT's per-operator profile (share of kernel time, top
operators) so a miss says where the time goes. The 1-minute load average is recorded per row.

    python benchmarks/bench_embed.py                                   # all backbones, 112 px, batch 1/32/128
    python benchmarks/bench_embed.py --backbones resnet18 mobilenetv2 --batches 32

On a GPU the eager model runs with the Triton kernel backend and ORT with the CUDA provider.
Writes benchmarks/results/embed-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from benchmarks.common import device_name, ort_profile, print_table, write_results  # noqa: E402

DEFAULT_BACKBONES = ["resnet18", "resnet34", "resnet50", "mobilenetv2", "convnext_atto", "convnext_nano",
                     "convnext_pico", "convnext_t"]
COLUMNS = ["backbone", "batch", "eager_img_s", "ort_img_s", "ort_vs_eager", "ratio_min", "ratio_max",
           "load_avg_1m", "top_ops"]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbones", nargs="+", default=DEFAULT_BACKBONES)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32, 128])
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--embedding-dim", type=int, default=512)
    p.add_argument("--width", type=float, default=None, help="backbone width (default: the recipe's)")
    p.add_argument("--min-time", type=float, default=1.5, help="seconds per timed window")
    p.add_argument("--repeats", type=int, default=5, help="alternating rounds per case (medians reported)")
    p.add_argument("--target", type=float, default=1.5, help="ORT/eager ratio below which a row is profiled")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--serve", nargs=3, metavar=("RUNTIME", "MODEL", "DEVICE"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def window(fn, batch: int, min_time: float) -> float:
    """Images/s over one window of at least ``min_time`` seconds (whole calls)."""
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        dt = time.perf_counter() - t0
        if dt >= min_time:
            return n * batch / dt


def serve(runtime: str, model: str, device: str) -> None:
    """Worker loop: one JSON command per stdin line ``{"batch", "size", "seconds"}`` -> one JSON
    line ``{"img_s"}``. The first command for a batch size first runs an untimed window (eager
    PyTorch on CPU measured 150-220 img/s in its first seconds against 400-590 after, ConvNeXt-atto
    batch 32: allocator and oneDNN primitive caches)."""
    import torch
    from facefuse.export.runtime import OnnxEmbedder, TorchEmbedder

    emb = TorchEmbedder(model, device=device) if runtime == "eager" else OnnxEmbedder(model)
    warm = set()
    for line in sys.stdin:
        cmd = json.loads(line)
        x = torch.randn(cmd["batch"], 3, cmd["size"], cmd["size"], generator=torch.Generator().manual_seed(0))
        fn = lambda: emb.embed_tensor(x)  # noqa: E731
        if cmd["batch"] not in warm:
            fn()
            window(fn, cmd["batch"], cmd["seconds"])
            warm.add(cmd["batch"])
        print(json.dumps({"img_s": window(fn, cmd["batch"], cmd["seconds"])}), flush=True)


class Worker:
    def __init__(self, runtime: str, model: Path, device: str):
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve", runtime, str(model), device],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def rate(self, batch: int, size: int, seconds: float) -> float:
        self.proc.stdin.write(json.dumps({"batch": batch, "size": size, "seconds": seconds}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"benchmark worker exited with {self.proc.wait()}")
        return json.loads(line)["img_s"]

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


def top_ops(model: Path, batch: int, size: int) -> list[tuple[str, float]]:
    """ORT's top operator types at this batch and their share of kernel time (``common.ort_profile``)."""
    x = np.random.default_rng(0).standard_normal((batch, 3, size, size), dtype=np.float32)
    return [(p["op"], p["share"]) for p in ort_profile(model, x, top=6)]


def make_model(backbone: str, args, folder: Path) -> Path:
    import torch
    from facefuse.trainer.checkpoint import ModelMeta, save_model_file
    from facefuse.trainer.config import ModelConfig
    from facefuse.trainer.model import build_model

    extra = {} if args.width is None else {"width": args.width}
    cfg = ModelConfig(backbone=backbone, embedding_dim=args.embedding_dim, image_size=args.image_size, **extra)
    torch.manual_seed(0)
    model = build_model(cfg, 2).eval()
    path = folder / f"{backbone}.pt"
    save_model_file(path, model, ModelMeta.for_model(cfg, model, 2, (0.5,) * 3, (0.5,) * 3))
    return path


def compare(eager: Worker, ort: Worker, batch: int, args) -> dict:
    rates = {"eager": [], "ort": []}
    for r in range(args.repeats):
        order = (("eager", eager), ("ort", ort)) if r % 2 == 0 else (("ort", ort), ("eager", eager))
        for name, w in order:
            rates[name].append(w.rate(batch, args.image_size, args.min_time))
    ratios = np.array(rates["ort"]) / np.array(rates["eager"])
    return {"eager_img_s": float(np.median(rates["eager"])), "ort_img_s": float(np.median(rates["ort"])),
            "ort_vs_eager": float(np.median(ratios)), "ratio_min": float(ratios.min()),
            "ratio_max": float(ratios.max()), "eager_windows": rates["eager"], "ort_windows": rates["ort"]}


def main(argv=None):
    args = parse_args(argv)
    if args.serve:
        return serve(*args.serve)
    import torch
    from facefuse.export.onnx_export import export_onnx
    from facefuse.export.runtime import session_options

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    opts = session_options()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for backbone in args.backbones:
            ckpt = make_model(backbone, args, Path(tmp))
            onnx_path = Path(tmp) / f"{backbone}.onnx"
            t = time.perf_counter()
            rep = export_onnx(ckpt, onnx_path)
            export_s = time.perf_counter() - t
            eager, ort = Worker("eager", ckpt, device), Worker("ort", onnx_path, device)
            try:
                for b in args.batches:
                    row = {"backbone": backbone, "batch": b, "image_size": args.image_size,
                           **compare(eager, ort, b, args), "load_avg_1m": os.getloadavg()[0],
                           "exporter": rep.exporter, "export_s": export_s, "min_cosine": rep.min_cosine,
                           "eager_device": device, "ort_provider": rep.providers[0]}
                    if row["ort_vs_eager"] < args.target and device == "cpu":
                        row["top_ops"] = top_ops(onnx_path, b, args.image_size)
                    print_table([row], COLUMNS)
                    results.append(row)
            finally:
                eager.close()
                ort.close()
    print("\nall cases:")
    print_table(results, COLUMNS)
    settings = dict(vars(args), serve=None, torch_threads=torch.get_num_threads(),
                    ort_intra_op_threads=opts.intra_op_num_threads,
                    ort_graph_optimization=str(opts.graph_optimization_level),
                    ort_allow_spinning=opts.get_session_config_entry("session.intra_op.allow_spinning"))
    path = write_results("embed", device_name(device), settings, results)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
