"""facefuse command line: parse options, call the library, print. No logic lives here."""

from __future__ import annotations

import json
import sys

import click

from facefuse.trainer.config import ModelConfig
from facefuse.core.errors import FacefuseError


class Group(click.Group):
    """Turns library errors into one ``error: ...`` line and exit code 2 (traceback with --debug)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except FacefuseError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.pass_context
def main(ctx, debug):
    """facefuse: train face-embedding models from scratch, export them, verify and search faces."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


# ---------------------------------------------------------------- training (trainer/)

# option name -> dotted config key (None values are not overrides)
TRAIN_OPTIONS = {
    "data": "data.root", "out": "out", "epochs": "optim.epochs", "batch_size": "optim.batch_size",
    "backbone": "model.backbone", "loss": "loss.name", "image_size": "model.image_size",
    "val_pairs": "data.val_pairs", "val_pairs_root": "data.val_pairs_root", "val_pairs_fold": "data.val_pairs_fold",
    "val_pairs_disjoint": "data.val_pairs_disjoint",
    "exclude_identities": "data.exclude_identities", "device": "device", "lr": "optim.lr",
    "optimizer": "optim.optimizer", "weight_decay": "optim.weight_decay", "warmup": "optim.warmup_epochs",
    "embedding_dim": "model.embedding_dim", "width": "model.width", "dropout": "model.dropout",
    "drop_path": "model.drop_path", "neck": "model.neck", "margin": "loss.margin", "scale": "loss.s",
    "label_smoothing": "loss.label_smoothing", "pair_loss": "loss.pair", "pair_weight": "loss.pair_weight",
    "pair_margin": "loss.pair_margin", "mining": "loss.mining", "center_lr": "loss.center_lr",
    "sampler": "data.sampler", "amp": "optim.amp", "ema": "optim.ema_decay", "grad_clip": "optim.grad_clip",
    "kernels": "model.kernel_backend", "workers": "data.num_workers", "seed": "seed", "skip_bad": "data.skip_bad",
    "init_from": "init_from", "time_budget": "time_budget", "mixup": "augment.mixup", "cutmix": "augment.cutmix",
    "randaugment": "augment.randaugment", "color_jitter": "augment.color_jitter",
    "random_erasing": "augment.random_erasing", "hflip": "augment.hflip", "vflip": "augment.vflip",
    "perspective": "augment.perspective", "crop_scale": "augment.crop_scale", "min_images": "data.min_images",
    "val_fraction": "data.val_fraction", "threads": "threads", "checkpoint_minutes": "checkpoint_minutes",
}


@main.command()
@click.option("--data", type=click.Path(), help="Training images: one sub-folder per identity.")
@click.option("--out", type=click.Path(), required=True, help="Run folder (config, checkpoints, metrics, summary).")
@click.option("--config", "config_file", type=click.Path(), help="YAML/JSON config; options given here override it.")
@click.option("--resume", is_flag=True, help="Continue the run in --out exactly where its last checkpoint left it.")
@click.option("--epochs", type=int, help="Training epochs.")
@click.option("--batch-size", type=int, help="Global batch size (split over torchrun processes).")
@click.option("--backbone", help="resnet18|resnet34|resnet50|convnext_t|convnext_nano|convnext_pico|convnext_atto|mobilenetv2.")
@click.option("--loss", help="Classification head (softmax, normface, arcface, cosface, sphereface, combined) or a pair loss alone (triplet, supcon, ...).")
@click.option("--image-size", type=int, help=f"Model input side in pixels (default {ModelConfig.image_size}).")
@click.option("--val-pairs", type=click.Path(), help="Verification pairs for validation: LFW pairs.txt or `path_a path_b label` lines.")
@click.option("--val-pairs-root", type=click.Path(), help="Folder the pairs' image paths are relative to.")
@click.option("--val-pairs-fold", type=int, help="Use only this fold of an LFW pairs file.")
@click.option("--val-pairs-disjoint", is_flag=True, default=None,
              help="Leave the identities of the validation pairs out of training (open-set validation).")
@click.option("--exclude-identities", type=click.Path(), help="File of identity names (one per line) to leave out.")
@click.option("--device", help="auto, cpu or cuda.")
@click.option("--lr", type=float, help="Peak learning rate.")
@click.option("--optimizer", help="adamw or sgd.")
@click.option("--weight-decay", type=float, help="Weight decay (not applied to norms and biases).")
@click.option("--warmup", type=float, help="Linear warm-up length in epochs.")
@click.option("--embedding-dim", type=int, help=f"Embedding size D (default {ModelConfig.embedding_dim}).")
@click.option("--width", type=float, help="Backbone channel multiplier.")
@click.option("--dropout", type=float, help="Dropout before the classifier.")
@click.option("--drop-path", type=float, help="Stochastic depth rate (residual blocks of every backbone).")
@click.option("--neck", help="Feature map to embedding: gdc, flatten or gap.")
@click.option("--margin", type=float, help="Margin in radians (ArcFace/CosFace) or m for SphereFace.")
@click.option("--scale", type=float, help="Logit scale s for normalised heads.")
@click.option("--label-smoothing", type=float, help="Label smoothing of the cross-entropy.")
@click.option("--pair-loss", help="Joint pair loss: triplet, center, npair, circle, supcon.")
@click.option("--pair-weight", type=float, help="lambda in classification + lambda * pair loss.")
@click.option("--pair-margin", type=float, help="Triplet margin (cosine distance) or circle loss m.")
@click.option("--mining", help="Triplet mining: batch_hard, semi_hard or all.")
@click.option("--center-lr", type=float, help="Fixed learning rate of the center-loss centers (default: the model's lr and schedule).")
@click.option("--sampler", help="random, or pk (P identities x K images, for pair losses).")
@click.option("--pk", nargs=2, type=int, help="P and K for --sampler pk.")
@click.option("--amp", help="Mixed precision: auto, none, bf16, fp16.")
@click.option("--ema", type=float, help="EMA decay of the weights (0 = off).")
@click.option("--grad-clip", type=float, help="Max gradient norm (0 = off).")
@click.option("--kernels", help="auto, torch or triton (fused ArcFace head and depthwise conv).")
@click.option("--workers", type=int, help="DataLoader worker processes.")
@click.option("--seed", type=int, help="Random seed.")
@click.option("--skip-bad", is_flag=True, default=None, help="Skip corrupt images and empty identity folders, with a count.")
@click.option("--init-from", type=click.Path(), help="Sequential fine-tuning: start from this run/checkpoint's embedder.")
@click.option("--time-budget", type=float, help="Minutes of training; the schedule follows the budget and stops when spent.")
@click.option("--mixup", type=float, help="MixUp alpha (0 = off).")
@click.option("--cutmix", type=float, help="CutMix alpha (0 = off).")
@click.option("--randaugment", type=int, help="RandAugment magnitude (0 = off).")
@click.option("--color-jitter", type=float, help="ColorJitter strength (0 = off).")
@click.option("--random-erasing", type=float, help="RandomErasing probability.")
@click.option("--hflip", type=float, help="Horizontal flip probability.")
@click.option("--vflip", type=float, help="Vertical flip probability.")
@click.option("--perspective", type=float, help="RandomPerspective distortion (0 = off).")
@click.option("--crop-scale", type=float, help="RandomResizedCrop minimum scale (1 = off).")
@click.option("--min-images", type=int, help="Drop identities with fewer images.")
@click.option("--val-fraction", type=float, help="Fraction of each identity's images held out for accuracy.")
@click.option("--threads", type=int, help="CPU threads for torch (0 = default).")
@click.option("--checkpoint-minutes", type=float, help="Also checkpoint this often within an epoch.")
@click.option("--no-progress", is_flag=True, help="No progress bar (logs per epoch only).")
def train(config_file, resume, pk, no_progress, **options):
    """Train a face-embedding model from scratch on a folder of identities."""
    from facefuse.trainer.config import resolve_config
    from facefuse.trainer.engine import train as run_training

    overrides = {TRAIN_OPTIONS[k]: v for k, v in options.items() if v is not None}
    if pk:
        overrides["data.pk_identities"], overrides["data.pk_images"] = pk
    if resume and not config_file:
        from pathlib import Path

        saved = Path(options["out"]) / "config.yaml"
        config_file = str(saved) if saved.is_file() else None
    if not overrides.get("data.root") and not config_file:
        raise click.UsageError("--data is required (a folder with one sub-folder of images per identity)")
    cfg = resolve_config(config_file, overrides)
    summary = run_training(cfg, resume=resume, progress=not no_progress)
    click.echo(json.dumps(summary, indent=2))


# ---------------------------------------------------------------- inference (export/, index/)

MODEL_HELP = "An exported .onnx file, or a facefuse checkpoint / run folder."


@main.command("export")
@click.option("--onnx", "onnx_out", type=click.Path(), required=True, help="Output .onnx file.")
@click.option("--checkpoint", type=click.Path(), required=True, help="Model file, training checkpoint or run folder.")
@click.option("--fp16", is_flag=True, help="Compute in float16 inside the graph (float32 inputs and outputs).")
@click.option("--opset", type=click.IntRange(min=7), help="ONNX opset (default: the exporter's).")
@click.option("--check-images", type=click.Path(), help="Folder of images for the parity check (default: shared LFW).")
@click.option("--exporter", type=click.Choice(["auto", "dynamo", "torchscript"]), default="auto", show_default=True,
              help="auto tries dynamo first and falls back to TorchScript.")
def export_cmd(onnx_out, checkpoint, fp16, opset, check_images, exporter):
    """Export the embedding model to ONNX (dynamic batch) and check it against PyTorch."""
    from facefuse.export.onnx_export import export_onnx

    r = export_onnx(checkpoint, onnx_out, fp16=fp16, opset=opset, check_images=check_images, exporter=exporter)
    click.echo(f"exported {r.path} ({r.dtype}, opset {r.opset}) with the {r.exporter} exporter"
               + (f" (dynamo failed: {r.fallback_reason})" if r.fallback_reason else ""))
    click.echo(f"parity vs PyTorch on {r.check_source} via {r.providers[0]}: min cosine {r.min_cosine:.7f} "
               f"(required >= {r.required_cosine}), max abs diff {r.max_abs_diff:.3g}")


def _embedder(model):
    from facefuse.export.runtime import load_embedder

    return load_embedder(model)


@main.group("index")
def index_group():
    """Build and extend an on-disk gallery index (one folder: index.faiss + meta.json)."""


@index_group.command("build")
@click.argument("gallery_dir", type=click.Path())
@click.option("--model", required=True, type=click.Path(), help=MODEL_HELP)
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(), help="Index folder to write.")
@click.option("--kind", type=click.Choice(["flat", "ivf", "hnsw"]), default="flat", show_default=True,
              help="flat: exact; ivf: IndexIVFFlat; hnsw: IndexHNSWFlat (M=32).")
@click.option("--nlist", type=click.IntRange(min=1), help="IVF lists (default 4*sqrt(n)).")
@click.option("--hnsw-m", type=click.IntRange(min=4), default=32, show_default=True, help="HNSW neighbours per node.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--workers", type=click.IntRange(min=0), help="Image-decoding worker processes.")
@click.option("--flip", is_flag=True, help="Flip test-time augmentation (also used for later adds and searches).")
@click.option("--skip-missing", is_flag=True, help="Skip unreadable images with a count instead of failing.")
def index_build(gallery_dir, model, out_dir, kind, nlist, hnsw_m, batch_size, workers, flip, skip_missing):
    """Enroll GALLERY_DIR (one folder per identity, or images named <identity>_<anything>.jpg)."""
    from facefuse.index.enroll import build_index_folder

    params = {"nlist": nlist} if kind == "ivf" else {"hnsw_m": hnsw_m} if kind == "hnsw" else {}
    g, skipped = build_index_folder(gallery_dir, _embedder(model), model, out_dir, kind=kind, batch_size=batch_size,
                                    num_workers=workers, flip_tta=flip, skip_missing=skip_missing, **params)
    click.echo(f"indexed {len(g)} images of {len(g.names())} identities ({kind}, dim {g.dim}) into {out_dir}"
               + (f"; skipped {skipped} unreadable images" if skipped else ""))


@index_group.command("add")
@click.argument("index_dir", type=click.Path())
@click.argument("images", nargs=-1, required=True, type=click.Path())
@click.option("--model", type=click.Path(), help=MODEL_HELP + " Default: the one the index was built with.")
@click.option("--identity", help="Identity of every image given (default: from folder / <identity>_ file names).")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--workers", type=click.IntRange(min=0), help="Image-decoding worker processes.")
def index_add(index_dir, images, model, identity, batch_size, workers):
    """Enroll more IMAGES (files or gallery folders) into INDEX_DIR without rebuilding it."""
    from facefuse.index.enroll import add_to_index_folder, index_model_path

    embedder = _embedder(model or index_model_path(index_dir))
    g, added = add_to_index_folder(index_dir, images, embedder, identity=identity, batch_size=batch_size,
                                   num_workers=workers)
    click.echo(f"added {added} images; {index_dir} now holds {len(g)} images of {len(g.names())} identities")


@main.command("search")
@click.argument("images", nargs=-1, required=True, type=click.Path())
@click.option("--index", "index_dir", required=True, type=click.Path(), help="Index folder from `index build`.")
@click.option("--model", type=click.Path(), help=MODEL_HELP + " Default: the one the index was built with.")
@click.option("--top-k", type=click.IntRange(min=1), default=5, show_default=True, help="Distinct identities per query.")
@click.option("--threshold", type=float, help="Cosine below which the answer is `unknown`.")
@click.option("--nprobe", type=click.IntRange(min=1), help="IVF lists visited per query (default 16).")
@click.option("--ef-search", type=click.IntRange(min=1), help="HNSW candidates per query (default 64).")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--workers", type=click.IntRange(min=0), help="Image-decoding worker processes.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def search_cmd(images, index_dir, model, top_k, threshold, nprobe, ef_search, batch_size, workers, as_json):
    """Identify each face in IMAGES (files or folders) against a gallery index."""
    from facefuse.index.enroll import index_model_path, search_images

    embedder = _embedder(model or index_model_path(index_dir))
    results = search_images(images, index_dir, embedder, top_k=top_k, threshold=threshold, batch_size=batch_size,
                            num_workers=workers, nprobe=nprobe, ef_search=ef_search)
    if as_json:
        click.echo(json.dumps(results, indent=1))
        return
    for r in results:
        top = ", ".join(f"{m['identity']} {m['score']:.3f}" for m in r["matches"])
        click.echo(f"{r['path']}\t{r['identity']}\t[{top}]")


@main.command("verify")
@click.argument("pairs", type=click.Path())
@click.option("--model", required=True, type=click.Path(), help=MODEL_HELP)
@click.option("--root", type=click.Path(), help="Folder the image paths are relative to (default: the pairs file's).")
@click.option("--out", "out_csv", type=click.Path(), help="Write per-pair scores to this CSV.")
@click.option("--threshold", type=float, help="Cosine at or above which a pair is `same` (default with labels: best).")
@click.option("--plot", type=click.Path(), help="Draw the ROC curve to this image (png, pdf, svg...).")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as one JSON object.")
@click.option("--skip-missing", is_flag=True, help="Skip missing/unreadable images (and their pairs) with a count.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--workers", type=click.IntRange(min=0), help="Image-decoding worker processes.")
@click.option("--flip", is_flag=True, help="Flip test-time augmentation: e(image) + e(mirror).")
def verify_cmd(pairs, model, root, out_csv, threshold, plot, as_json, skip_missing, batch_size, workers, flip):
    """Score every pair in PAIRS (LFW pairs.txt / pairsDev*.txt, or `path_a path_b [label]` lines)."""
    from pathlib import Path

    from facefuse.core.pairs import read_pairs
    from facefuse.index.verify import check_plot_path, plot_roc, verify_pairs, write_scores_csv

    if plot:
        check_plot_path(plot)
    for opt, p in (("--out", out_csv), ("--plot", plot)):
        if p and Path(p).is_dir():
            raise FacefuseError(f"{opt} {p}: is a folder; give a file name")
    parsed = read_pairs(pairs, root=root)
    if plot and parsed.labels is None:
        raise FacefuseError(f"--plot needs labels, and {pairs} has none")
    r = verify_pairs(parsed, _embedder(model), batch_size=batch_size, num_workers=workers,
                     flip_tta=flip, skip_missing=skip_missing, threshold=threshold)
    if out_csv:
        write_scores_csv(out_csv, r)
    if plot:
        plot_roc(plot, r)
    summary = {"pairs": len(r.pairs), "scored_pairs": int(r.scored.sum()), "images": r.n_images,
               "skipped_images": r.n_skipped_images, "format": r.pairs.format, **(r.metrics or {})}
    if r.metrics is None and r.threshold is not None:
        dec = r.decisions()[r.scored]
        summary.update(threshold=r.threshold, same=int(dec.sum()), different=int((1 - dec).sum()))
    if as_json:
        click.echo(json.dumps(summary))
        return
    for key, value in summary.items():
        click.echo(f"{key:<18} {value:.4f}" if isinstance(value, float) else f"{key:<18} {value}")
    if r.metrics is None and r.threshold is None:
        click.echo("no labels and no --threshold: scores only" + (f" (written to {out_csv})" if out_csv else ""))


if __name__ == "__main__":
    main()
