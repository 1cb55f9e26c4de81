"""facefuse command line: parse options, call the library, print. No logic lives here."""

from __future__ import annotations

import json
import sys
import typing

import click

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

def _option_name(key: str, f) -> str:
    """``optim.lr`` -> ``lr``: a setting's option is its own name (``data.root`` is ``--data`` and
    ``loss.name`` is ``--loss``, as their metadata says)."""
    return f.metadata.get("option", key.rsplit(".", 1)[-1]).replace("_", "-")


def _choices_help(key: str) -> str:
    """Valid names of the settings that live in registries (read from the registries)."""
    if key not in ("model.backbone", "model.neck", "loss.name", "loss.pair_loss"):
        return ""
    from facefuse.trainer.backbones import BACKBONES
    from facefuse.trainer.losses import HEADS, PAIR_LOSSES
    from facefuse.trainer.model import NECKS

    names = {"model.backbone": BACKBONES.names(), "model.neck": NECKS.names(),
             "loss.name": HEADS.names() + PAIR_LOSSES.names(), "loss.pair_loss": PAIR_LOSSES.names()}[key]
    return f" One of: {', '.join(names)}."


def _setting_options(command):
    """One option per scalar setting of :class:`TrainConfig`, named as the setting, with the
    dataclass default in its help; lists and mappings are set with ``--set key=value``."""
    from facefuse.trainer.config import default_of, leaf_fields

    scalar = {int: click.INT, float: click.FLOAT, str: click.STRING, bool: None}
    seen: dict[str, str] = {}
    for key, f, t in reversed(list(leaf_fields())):
        base = next((a for a in typing.get_args(t) if a is not type(None)), t)
        if base not in scalar:
            continue
        opt = _option_name(key, f)
        assert opt not in seen, f"settings {key} and {seen[opt]} would share the option --{opt}"
        seen[opt] = key
        SETTING_OPTIONS[key.replace(".", "__")] = (key, f"--{opt}")
        text = f"{f.metadata.get('help', '')}{_choices_help(key)} [{key}; default: {default_of(f)}]"
        decls = [f"--{opt}/--no-{opt}"] if base is bool else [f"--{opt}"]
        command = click.option(*decls, key.replace(".", "__"), type=scalar[base], default=None, help=text)(command)
    return command


SETTING_OPTIONS: dict[str, tuple[str, str]] = {}  # click parameter -> (setting, option as written)


def train_overrides(options: dict, pk=None, settings=()) -> tuple[dict, dict]:
    """``train``'s parsed options as ``({dotted setting: value}, {dotted setting: option as written})``:
    setting options first, then ``--pk``, then ``--set`` items (the last one given wins)."""
    from facefuse.trainer.config import parse_set

    overrides, sources = {}, {}
    for param, value in options.items():
        if value is not None and param in SETTING_OPTIONS:
            key, written = SETTING_OPTIONS[param]
            overrides[key], sources[key] = value, written
    for key, value in zip(("data.pk_identities", "data.pk_images"), pk or ()):
        overrides[key], sources[key] = value, "--pk"
    for key, value in parse_set(settings).items():
        overrides[key], sources[key] = value, f"--set {key}"
    return overrides, sources


@main.command()
@click.option("--config", "config_files", type=click.Path(), multiple=True,
              help="YAML/JSON config file(s), applied in order; options given here override them.")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE",
              help="Any setting by its dotted name, e.g. --set optim.lr=3e-3 or --set loss.pair_options.margin=0.3.")
@click.option("--resume", is_flag=True, help="Continue the run in --out exactly where its last checkpoint left it.")
@click.option("--pk", nargs=2, type=int, help="P K: shorthand for --pk-identities P --pk-images K.")
@click.option("--no-progress", is_flag=True, help="No progress bar (logs per epoch only).")
@_setting_options
def train(config_files, settings, resume, pk, no_progress, **options):
    """Train a face-embedding model from scratch on a folder of identities.

    Every setting has one name: the YAML key (`optim: {lr: 0.003}`), the dotted --set name
    (`--set optim.lr=3e-3`) and, for scalars, the option (`--lr 3e-3`)."""
    from pathlib import Path

    from facefuse.trainer.config import resolve_config
    from facefuse.trainer.engine import train as run_training

    overrides, sources = train_overrides(options, pk, settings)
    if resume and not config_files and overrides.get("out"):
        saved = Path(overrides["out"]) / "config.yaml"
        config_files = (str(saved),) if saved.is_file() else ()
    if not overrides.get("out"):
        raise click.UsageError("--out is required (the run folder)")
    if not overrides.get("data.root") and not config_files:
        raise click.UsageError("--data is required (a folder with one sub-folder of images per identity)")
    cfg = resolve_config(list(config_files), overrides, sources)
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


@main.command("quantize")
@click.argument("onnx_in", type=click.Path())
@click.option("--out", required=True, type=click.Path(), help="INT8 .onnx file to write.")
@click.option("--calib-images", required=True, type=click.Path(),
              help="Folder of face images (any depth) to calibrate the activation ranges on.")
@click.option("--n-images", type=click.IntRange(min=4), default=256, show_default=True,
              help="Calibration images used (a quarter is held out for the cosine check).")
@click.option("--calib-method", type=click.Choice(["minmax", "percentile", "entropy"]), default="percentile",
              show_default=True)
@click.option("--reduce-range", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="7-bit weights (for x86 CPUs without VNNI; auto reads this CPU's flags).")
def quantize_cmd(onnx_in, out, calib_images, n_images, calib_method, reduce_range):
    """Quantize an exported float32 ONNX model to INT8 (QDQ, per-channel weights) and check it."""
    from facefuse.export.quantize import quantize_int8

    rr = {"auto": "auto", "on": True, "off": False}[reduce_range]
    r = quantize_int8(onnx_in, out, calib_images, n_images=n_images, method=calib_method, reduce_range=rr)
    click.echo(f"wrote {r.path} (INT8 QDQ, {'+'.join(r.ops)}, {r.method} ranges on {r.n_calibration} images"
               + (f", 7-bit weights" if r.reduce_range else "") + (f", {r.skipped} unreadable skipped" if r.skipped else "")
               + ")")
    click.echo(f"check vs float32 on {r.n_check} held-out images: min cosine {r.min_cosine:.5f}, "
               f"mean {r.mean_cosine:.5f}")


def _embedder(model):
    from facefuse.export.runtime import load_embedder

    return load_embedder(model)


@main.command("embed")
@click.argument("source", type=click.Path())
@click.option("--model", required=True, type=click.Path(), help=MODEL_HELP)
@click.option("--out", "out_dir", required=True, type=click.Path(),
              help="Folder to write (embeddings-RANK-of-WORLD.npy shards, paths.txt, labels.txt, manifest.json).")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--workers", type=click.IntRange(min=0), help="Image-decoding worker processes.")
@click.option("--flip", is_flag=True, help="Flip test-time augmentation: e(image) + e(mirror).")
def embed_cmd(source, model, out_dir, batch_size, workers, flip):
    """Embed SOURCE (a folder of identity folders, or a list file of image paths) into --out;
    under torchrun each process embeds its own part of the images."""
    from facefuse.export.extract import extract_embeddings

    r = extract_embeddings(source, model, out_dir, batch_size=batch_size, num_workers=workers, flip_tta=flip)
    if r.rank == 0:
        click.echo(f"embedded {r.count} images (dim {r.dim}) on {r.world_size} process(es) into {r.out}")


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
