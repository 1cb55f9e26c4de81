"""Precision table: float32 ONNX vs INT8 ONNX (and eager PyTorch) for one trained model.

For each precision: throughput at one batch size (ONNX Runtime, CPU, the given threads), measured
in interleaved repeats so that load on the machine hits every variant alike (the median is
reported with the machine's load average), and LFW fold-k verification (10-way accuracy inside
the fold, ROC AUC, with flip TTA) on the fold's official pairs. The model must be trained
identity-disjoint from the fold (``facefuse train ... --val-pairs-fold K --val-pairs-disjoint``);
the INT8 model is calibrated on training identities only (``--calib-images``). Each ONNX row
also carries ORT's per-operator profile at the same batch (``top_ops``: share of kernel time and
ms per batch per operator type), which is where INT8's time goes.

    python benchmarks/bench_precision.py --model runs/lfw-default --calib-images runs/calib-faces
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import device_name, ort_profile, print_table, write_results  # noqa: E402


VARIANTS = {"onnx-int8-matmul-only": ("MatMul", "Gemm"), "onnx-int8-conv-only": ("Conv",)}


def fold_pairs(k: int):
    """The official pairs of LFW fold ``k`` (paths, labels)."""
    from facefuse.core.pairs import read_pairs
    from facefuse.core.paths import lfw_dir

    pairs = read_pairs(lfw_dir() / "pairs.txt")
    keep = pairs.folds == k
    a = [p for p, m in zip(pairs.paths_a, keep) if m]
    b = [p for p, m in zip(pairs.paths_b, keep) if m]
    return a, b, pairs.labels[keep].astype(bool)


def verification(embedder, a, b, labels, batch_size: int) -> dict:
    from facefuse.core.metrics import verification_metrics

    uniq = sorted(set(a) | set(b))
    index = {p: i for i, p in enumerate(uniq)}
    emb, _ = embedder.embed_paths(uniq, batch_size=batch_size, workers=0, flip=True)
    scores = np.sum(emb[[index[p] for p in a]] * emb[[index[p] for p in b]], axis=1)
    m = verification_metrics(scores, labels.astype(np.int64), folds=np.zeros(len(scores), dtype=np.int64))  # one fold: split 10-way inside it, as lfw_protocol
    return {"accuracy": m["kfold_accuracy"], "accuracy_std": m["kfold_std"], "auc": m["roc_auc"],
            "tar_at_far_1e-2": m["tar_at_far_1e-2"]}


def throughput(embedders: dict, x: np.ndarray, repeats: int) -> dict:
    """Images per second of each embedder, median of ``repeats`` interleaved timings."""
    times = {name: [] for name in embedders}
    for e in embedders.values():
        e.embed_tensor(x)  # warm-up
    for _ in range(repeats):
        for name, e in embedders.items():
            t0 = time.perf_counter()
            e.embed_tensor(x)
            times[name].append(time.perf_counter() - t0)
    return {name: len(x) / float(np.median(t)) for name, t in times.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, type=Path, help="run folder or model file (trained disjoint from --fold)")
    ap.add_argument("--calib-images", required=True, type=Path, help="training-identity faces for INT8 calibration")
    ap.add_argument("--fold", type=int, default=0)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2, help="ONNX Runtime / torch intra-op threads")
    ap.add_argument("--int8-variants", action="store_true",
                    help="also INT8 models quantizing only the MatMul/Gemm or only the Conv operators")
    args = ap.parse_args(argv)

    import torch

    from facefuse.export.onnx_export import export_onnx
    from facefuse.export.quantize import quantize_int8
    from facefuse.export.runtime import OnnxEmbedder, TorchEmbedder

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        fp32, int8 = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        export_onnx(args.model, fp32)
        q = quantize_int8(fp32, int8, args.calib_images)
        files = {"onnx-fp32": fp32, "onnx-int8": int8}
        embedders = {"eager": TorchEmbedder(args.model, device="cpu"),
                     "onnx-fp32": OnnxEmbedder(fp32, threads=args.threads),
                     "onnx-int8": OnnxEmbedder(int8, threads=args.threads)}
        for name, ops in (VARIANTS.items() if args.int8_variants else ()):
            path = Path(tmp) / f"{name}.onnx"
            quantize_int8(fp32, path, args.calib_images, ops=ops)
            files[name] = path
            embedders[name] = OnnxEmbedder(path, threads=args.threads)
        size = embedders["eager"].meta.image_size
        x = np.random.default_rng(0).standard_normal((args.batch, 3, size, size)).astype(np.float32)
        load_before = os.getloadavg()[0]
        speed = throughput(embedders, x, args.repeats)
        load_after = os.getloadavg()[0]
        profiles = {name: ort_profile(path, x, threads=args.threads) for name, path in files.items()}
        a, b, labels = fold_pairs(args.fold)
        rows = []
        for name, e in embedders.items():
            rows.append({"precision": name, "img_per_s": round(speed[name], 1),
                         "speedup_vs_onnx_fp32": round(speed[name] / speed["onnx-fp32"], 3),
                         **{k: round(v, 4) for k, v in verification(e, a, b, labels, args.batch).items()},
                         "top_ops": profiles.get(name)})
    print_table(rows, ["precision", "img_per_s", "speedup_vs_onnx_fp32", "accuracy", "auc", "tar_at_far_1e-2"])
    for name, prof in profiles.items():
        print(f"{name}: " + ", ".join(f"{p['op']} {p['ms_per_run']:.1f} ms ({100 * p['share']:.0f}%)" for p in prof))
    settings = {"model": args.model.name, "backbone": embedders["eager"].meta.backbone, "image_size": size,
                "fold": args.fold, "batch": args.batch, "repeats": args.repeats, "threads": args.threads,
                "int8": {"min_cosine_held_out": round(q.min_cosine, 5), "mean_cosine_held_out": round(q.mean_cosine, 5),
                         "calibration_images": q.n_calibration, "reduce_range": q.reduce_range, "method": q.method},
                "load_average": [round(load_before, 2), round(load_after, 2)], "flip_tta": True}
    path = write_results("precision", device_name("cpu"), settings, rows)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
