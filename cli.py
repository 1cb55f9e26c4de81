"""facefuse command line: parse options, call the library, print. No logic lives here."""

from __future__ import annotations

import json
import sys

import click

from trainer.errors import FacefuseError


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
@click.option("--image-size", type=int, help="Model input side in pixels (default 112).")
@click.option("--val-pairs", type=click.Path(), help="Verification pairs for validation: LFW pairs.txt or `path_a path_b label` lines.")
@click.option("--val-pairs-root", type=click.Path(), help="Folder the pairs' image paths are relative to.")
@click.option("--val-pairs-fold", type=int, help="Use only this fold of an LFW pairs file.")
@click.option("--exclude-identities", type=click.Path(), help="File of identity names (one per line) to leave out.")
@click.option("--device", help="auto, cpu or cuda.")
@click.option("--lr", type=float, help="Peak learning rate.")
@click.option("--optimizer", help="adamw or sgd.")
@click.option("--weight-decay", type=float, help="Weight decay (not applied to norms and biases).")
@click.option("--warmup", type=float, help="Linear warm-up length in epochs.")
@click.option("--embedding-dim", type=int, help="Embedding size D (default 512).")
@click.option("--width", type=float, help="Backbone channel multiplier.")
@click.option("--dropout", type=float, help="Dropout before the classifier.")
@click.option("--drop-path", type=float, help="Stochastic depth rate (ConvNeXt).")
@click.option("--neck", help="Feature map to embedding: gdc, flatten or gap.")
@click.option("--margin", type=float, help="Margin in radians (ArcFace/CosFace) or m for SphereFace.")
@click.option("--scale", type=float, help="Logit scale s for normalised heads.")
@click.option("--label-smoothing", type=float, help="Label smoothing of the cross-entropy.")
@click.option("--pair-loss", help="Joint pair loss: triplet, center, npair, circle, supcon.")
@click.option("--pair-weight", type=float, help="lambda in classification + lambda * pair loss.")
@click.option("--pair-margin", type=float, help="Triplet margin (cosine distance) or circle loss m.")
@click.option("--mining", help="Triplet mining: batch_hard, semi_hard or all.")
@click.option("--center-lr", type=float, help="Learning rate of the center-loss centers.")
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
    from trainer.config import resolve_config
    from trainer.engine import train as run_training

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


if __name__ == "__main__":
    main()
