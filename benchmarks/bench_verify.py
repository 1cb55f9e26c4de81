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

Scale mode (``--scale``, no images): a labelled pairs file of ``--scale-pairs`` (10^6) lines over
``--scale-images`` (10^5) image names, and one synthetic unit embedding per image, go through what
``verify`` does after embedding: parse the file, score every pair (chunked), the metrics, the
streamed CSV. It reports peak resident memory (``getrusage``) next to the memory before the pairs
were read, and pairs/s; memory should follow the images, not the pairs. Writes
benchmarks/results/verify-scale-<device>.json.

    python benchmarks/bench_verify.py --scale
"""

from __future__ import annotations

import argparse
import os
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
    p.add_argument("--scale", action="store_true", help="the bounded-memory scale run on synthetic embeddings")
    p.add_argument("--scale-pairs", type=int, default=1_000_000)
    p.add_argument("--scale-images", type=int, default=100_000)
    p.add_argument("--scale-dim", type=int, default=256)
    return p.parse_args(argv)


def rss_mb() -> float:
    """Resident memory now (Linux /proc), MB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0), so the peak measured is that of the part timed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak resident memory since the last reset (VmHWM), else of the whole process (getrusage), MB."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


def scale_run(n_pairs: int, n_images: int, dim: int, seed: int = 0) -> dict:
    """Parse, score, metrics and stream the CSV of ``n_pairs`` labelled pairs over ``n_images``
    synthetic embeddings; time and memory of each part."""
    import numpy as np

    from facefuse.core import metrics
    from facefuse.core.embed import l2_normalize
    from facefuse.core.pairs import read_pairs
    from facefuse.verification.scoring import VerifyResult, pair_scores, write_scores_csv

    rng = np.random.default_rng(seed)
    ids = rng.integers(0, n_images // 4, n_images)  # ~4 images per identity
    centres = rng.standard_normal((n_images // 4, dim)).astype(np.float32)
    emb = l2_normalize(centres[ids] + 0.8 * rng.standard_normal((n_images, dim)).astype(np.float32))
    ia, ib = rng.integers(0, n_images, n_pairs), rng.integers(0, n_images, n_pairs)
    with tempfile.TemporaryDirectory() as tmp:
        pairs_file = Path(tmp) / "pairs.txt"
        with open(pairs_file, "w") as f:
            for lo in range(0, n_pairs, 1 << 16):
                a, b = ia[lo:lo + (1 << 16)], ib[lo:lo + (1 << 16)]
                f.writelines(f"img/{x:06d}.jpg\timg/{y:06d}.jpg\t{int(ids[x] == ids[y])}\n"
                             for x, y in zip(a.tolist(), b.tolist()))
        del ia, ib
        before, reset = rss_mb(), reset_peak_rss()
        t0 = time.perf_counter()
        pairs = read_pairs(pairs_file)
        t_parse = time.perf_counter() - t0
        # the file names the images img/000000.jpg ... in first-seen order: map them to their rows
        rows = np.array([int(p.stem) for p in pairs.images], dtype=np.int64)
        t1 = time.perf_counter()
        scores = pair_scores(emb[rows], pairs.ia, pairs.ib)
        t_score = time.perf_counter() - t1
        m = metrics.verification_metrics(scores, pairs.labels)
        t_metrics = time.perf_counter() - t1 - t_score
        result = VerifyResult(pairs, scores, ~np.isnan(scores), len(pairs.images), 0, m, m["best_threshold"])
        t2 = time.perf_counter()
        write_scores_csv(Path(tmp) / "scores.csv", result)
        t_csv = time.perf_counter() - t2
        total = time.perf_counter() - t0
    return {"pairs": n_pairs, "images": len(pairs.images), "dim": dim, "embeddings_mb": emb.nbytes / 2**20,
            "rss_before_mb": before, "peak_rss_mb": peak_rss_mb(), "peak_is_of_the_timed_part": reset,
            "parse_s": t_parse, "score_s": t_score,
            "metrics_s": t_metrics, "csv_s": t_csv, "total_s": total, "pairs_per_s": n_pairs / total,
            "score_pairs_per_s": n_pairs / t_score, "roc_auc": m["roc_auc"]}


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


SCALE_COLUMNS = ["pairs", "images", "embeddings_mb", "rss_before_mb", "peak_rss_mb", "parse_s", "score_s",
                 "metrics_s", "csv_s", "total_s", "pairs_per_s"]


def main(argv=None):
    args = parse_args(argv)
    import torch

    if args.scale:
        row = scale_run(args.scale_pairs, args.scale_images, args.scale_dim)
        row["load_avg_1m"] = os.getloadavg()[0]
        print_table([row], SCALE_COLUMNS)
        settings = {k: v for k, v in vars(args).items() if k.startswith("scale")}
        print(f"wrote {write_results('verify-scale', device_name('cpu'), settings, [row])}")
        return

    from facefuse.export.runtime import load_embedder
    from facefuse.core.pairs import read_pairs
    from facefuse.core.settings import EmbedSettings
    from facefuse.verification.scoring import verify_pairs

    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else random_model(args.backbone, args.runtime, Path(tmp))
        embedder = load_embedder(model)
        pairs = read_pairs(args.pairs, root=args.root)
        n_images = len(pairs.unique_paths()[0])
        rate = model_throughput(embedder, args.batch_size, args.min_time)
        t0 = time.perf_counter()
        settings = EmbedSettings(batch_size=args.batch_size, workers=args.workers)
        result = verify_pairs(pairs, embedder, settings)
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
