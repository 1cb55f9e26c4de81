"""facefuse command line: parse options, call the library, print. No logic lives here."""

from __future__ import annotations

import json
import re
import sys
import typing
from pathlib import Path

import click

from facefuse.core.errors import FacefuseError
from facefuse.core.settings import ALIGNMENTS, AUTO, EmbedSettings


class Command(click.Command):
    """Words library errors in this command's own options: the library names Python arguments
    (``far=0: ...``, ``skip_missing=True``), the shell user reads ``--far 0: ...``, ``--skip-missing``."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except FacefuseError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            raise CliError(option_words(str(exc), self)) from None


class CliError(Exception):
    """A library error already worded for the shell."""


def option_words(message: str, command: click.Command) -> str:
    """``message`` with every ``name=value`` / ``name=`` that names one of ``command``'s parameters
    (or a trainer setting, for ``train``) rewritten as the option: ``--name value`` / ``--name``, a
    flag's ``=True`` dropped; arguments become their metavar (``images=`` -> ``IMAGES``)."""
    words: dict[str, tuple[str, bool]] = {}
    for p in command.params:
        if isinstance(p, click.Option):
            words[p.name] = (next((o for o in p.opts if o.startswith("--")), p.opts[0]), p.is_flag)
        elif isinstance(p, click.Argument):
            words[p.name] = (p.human_readable_name, False)
    if command.name == "train":
        for key, written in SETTING_OPTIONS.values():
            words.setdefault(key, (written, written in BOOL_OPTIONS))
    if not words:
        return message
    names = "|".join(re.escape(n) for n in sorted(words, key=len, reverse=True))

    def swap(m: re.Match) -> str:
        option, flag = words[m.group(1)]
        if flag:
            return option
        return option + (" " if m.group(3) else "")

    pattern = rf"(?<![\w.\-])({names})=((?:True|False)(?![\w.])|)([^\s,;:)\]]?)"
    message = re.sub(pattern, lambda m: swap(m) + m.group(3), message)
    # a hint about a setting this command has no option for (search cannot skip images) is dropped
    return re.sub(r" \((\w+)=\S+ [^()]*\)", lambda m: "" if m.group(1) in SETTINGS_OPTIONS else m.group(0), message)


class Group(click.Group):
    """Turns library errors into one ``error: ...`` line and exit code 2 (traceback with --debug)."""

    command_class = Command

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (CliError, FacefuseError) as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


Group.group_class = Group


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
        if base is bool:
            BOOL_OPTIONS.add(f"--{opt}")
        command = click.option(*decls, key.replace(".", "__"), type=scalar[base], default=None, help=text)(command)
    return command


SETTING_OPTIONS: dict[str, tuple[str, str]] = {}  # click parameter -> (setting, option as written)
BOOL_OPTIONS: set[str] = set()  # the setting options that are on/off flags


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

    from facefuse.api import train as run_training
    from facefuse.trainer.config import resolve_config

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


# ---------------------------------------------------------------- inference (export/, index/, verification/)

MODEL_HELP = "An exported .onnx file, or a facefuse checkpoint / run folder."


@main.command("export")
@click.option("--onnx", "out", type=click.Path(), required=True, help="Output .onnx file.")
@click.option("--checkpoint", type=click.Path(), required=True, help="Model file, training checkpoint or run folder.")
@click.option("--fp16", is_flag=True, help="Compute in float16 inside the graph (float32 inputs and outputs).")
@click.option("--opset", type=click.IntRange(min=7), help="ONNX opset (default: the exporter's).")
@click.option("--check-images", type=click.Path(), help="Folder of images for the parity check (default: shared LFW).")
@click.option("--exporter", type=click.Choice(["auto", "dynamo", "torchscript"]), default="auto", show_default=True,
              help="auto tries dynamo first and falls back to TorchScript.")
@click.option("--int8", "int8_out", type=click.Path(),
              help="Also write an INT8 model here (needs --calib-images; see `facefuse quantize`).")
@click.option("--calib-images", type=click.Path(), help="Face images that calibrate the INT8 model's ranges.")
def export_cmd(out, checkpoint, fp16, opset, check_images, exporter, int8_out, calib_images):
    """Export the embedding model to ONNX (dynamic batch) and check it against PyTorch."""
    from facefuse import api

    if int8_out and (fp16 or not calib_images):
        raise click.UsageError("--int8 quantizes the float32 export: give --calib-images DIR, and not --fp16")
    r = api.export_onnx(checkpoint, out, fp16=fp16, opset=opset, check_images=check_images, exporter=exporter)
    click.echo(f"exported {r.path} ({r.dtype}, opset {r.opset}) with the {r.exporter} exporter"
               + (f" (dynamo failed: {r.fallback_reason})" if r.fallback_reason else ""))
    click.echo(f"parity vs PyTorch on {r.check_source} via {r.providers[0]}: min cosine {r.min_cosine:.7f} "
               f"(required >= {r.required_cosine}), max abs diff {r.max_abs_diff:.3g}")
    if r.thresholds:
        fars = ", ".join(f"{e['far']:g}" for e in r.thresholds)
        click.echo(f"carried the calibrated thresholds (FAR {fars})")
    if int8_out:
        _echo_quant(api.quantize_int8(r.path, int8_out, calib_images))


def _echo_quant(r) -> None:
    click.echo(f"wrote {r.path} (INT8 QDQ, {'+'.join(r.ops)}, {r.method} ranges on {r.n_calibration} images"
               + (", 7-bit weights" if r.reduce_range else "") + (f", {r.skipped} unreadable skipped" if r.skipped else "")
               + ")")
    click.echo(f"check vs float32 on {r.n_check} held-out images: min cosine {r.min_cosine:.5f}, "
               f"mean {r.mean_cosine:.5f}")


@main.command("quantize")
@click.argument("onnx_in", type=click.Path())
@click.option("--out", required=True, type=click.Path(), help="INT8 .onnx file to write.")
@click.option("--calib-images", required=True, type=click.Path(),
              help="Folder of face images (any depth) to calibrate the activation ranges on.")
@click.option("--n-images", type=click.IntRange(min=4), default=256, show_default=True,
              help="Calibration images used (a quarter is held out for the cosine check).")
@click.option("--calib-method", "method", type=click.Choice(["minmax", "percentile", "entropy"]),
              default="percentile", show_default=True)
@click.option("--reduce-range", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="7-bit weights (for x86 CPUs without VNNI; auto reads this CPU's flags).")
def quantize_cmd(onnx_in, out, calib_images, n_images, method, reduce_range):
    """Quantize an exported float32 ONNX model to INT8 (QDQ, per-channel weights) and check it."""
    from facefuse import api

    rr = {"auto": "auto", "on": True, "off": False}[reduce_range]
    _echo_quant(api.quantize_int8(onnx_in, out, calib_images, n_images=n_images, method=method, reduce_range=rr))


# How images become embeddings: one option per field of core.settings.EmbedSettings, read into one object.
SETTINGS_OPTIONS = {
    "flip": lambda: click.option("--flip", is_flag=True, default=None,
                                 help="Flip test-time augmentation: e(image) + e(mirror)."),
    "align": lambda: click.option(
        "--align", "--detect", "align", type=click.Choice([*ALIGNMENTS, AUTO]), default=None,
        help="Photos not aligned to the face template: haar crops the template square around the largest "
             "Haar-detected face; landmarks aligns the largest face by its five detected landmarks (a photo "
             "that is a template crop already passes through); auto: what the model's training faces need "
             "(landmarks for a model trained on template crops). --detect is the older name. [default: none]"),
    "center": lambda: click.option(
        "--center", is_flag=True, default=None,
        help="Centre the embeddings on the mean of all the images scored (at least 50) before cosine: what a "
             "set's faces share (grey, one camera) is removed, so a threshold calibrated with --center holds on "
             "faces unlike the calibration set (benchmarks/README.md, Centring)."),
    "batch_size": lambda: click.option("--batch-size", type=click.IntRange(min=1), default=None,
                                       help=f"Images per model run. [default: {EmbedSettings.batch_size}]"),
    "workers": lambda: click.option("--workers", type=click.IntRange(min=0), help="Image-decoding worker processes."),
    "skip_missing": lambda: click.option("--skip-missing", is_flag=True, default=None,
                                         help="Skip missing/unreadable images (and their pairs) with a count."),
}


def settings_options(*fields):
    """The options of these :class:`EmbedSettings` fields, in order."""
    def decorate(command):
        for name in reversed(fields):
            command = SETTINGS_OPTIONS[name]()(command)
        return command
    return decorate


def settings_from(options: dict) -> EmbedSettings:
    """The :class:`EmbedSettings` of a command's parsed options (removed from ``options``)."""
    return EmbedSettings().replace(**{k: options.pop(k) for k in list(options) if k in SETTINGS_OPTIONS})


def _check_embeddings_source(argument: str, given, embeddings, labels) -> None:
    """Images (``argument``) or precomputed embeddings, not both; embeddings need --labels unless
    they are a `facefuse embed` folder (its manifest carries them)."""
    from pathlib import Path

    from facefuse.export.extract import MANIFEST

    if given or not (embeddings and (labels or (Path(embeddings) / MANIFEST).is_file())):
        raise FacefuseError(f"give {argument}, or --embeddings with --labels (not both; a `facefuse embed` "
                            "folder carries its labels)")


@main.command("embed")
@click.argument("source", type=click.Path())
@click.option("--model", required=True, type=click.Path(), help=MODEL_HELP)
@click.option("--out", required=True, type=click.Path(),
              help="Folder to write (embeddings-RANK-of-WORLD.npy shards, paths.txt, labels.txt, manifest.json).")
@settings_options("batch_size", "workers", "flip", "align")
def embed_cmd(source, model, out, **options):
    """Embed SOURCE (a folder of identity folders, or a list file of image paths) into --out;
    under torchrun each process embeds its own part of the images."""
    from facefuse import api

    r = api.embed_to_folder(source, model, out, settings_from(options))
    if r.rank == 0:
        click.echo(f"embedded {r.count} images (dim {r.dim}) on {r.world_size} process(es) into {r.out}")


@main.command("align")
@click.argument("src", type=click.Path())
@click.argument("out", type=click.Path())
@click.option("--detector", default="mtcnn", show_default=True,
              help="Five-landmark face detector (facefuse.align.DETECTORS; e.g. mtcnn, dlib-hog, dlib-cnn).")
@click.option("--size", type=click.IntRange(min=16), default=112, show_default=True, help="Crop side in pixels.")
@click.option("--workers", type=click.IntRange(min=0), help="Worker processes (default: one per core; 0: none).")
@click.option("--on-none", type=click.Choice(["skip", "center", "error"]), default="skip", show_default=True,
              help="A photo without a face: no crop, the photo's centre square, or stop with an error.")
@click.option("--on-multiple", type=click.Choice(["largest", "skip"]), default="largest", show_default=True,
              help="A photo with several faces: align the largest, or write no crop.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def align_cmd(src, out, detector, size, workers, on_none, on_multiple, as_json):
    """Align the raw photos of SRC (identity folders, any depth) into trainable template crops in
    OUT (same layout, JPEG), with OUT/manifest.jsonl (per photo: box, score, landmarks, the face
    kept or why none). Resumable: photos already in the manifest are skipped. `facefuse train
    --data OUT` then trains on the crops."""
    from facefuse import api

    r = api.align_folder(src, out, detector=detector, size=size, workers=workers, on_none=on_none,
                         on_multiple=on_multiple, progress=True)
    if as_json:
        click.echo(json.dumps(r.to_dict()))
        return
    click.echo(f"aligned {r.aligned} of {r.photos} photos into {out} in {r.seconds:.1f} s"
               + (f" ({r.done_before} done before)" if r.done_before else "")
               + f"; several faces (largest kept) {r.several_faces}, no face {r.no_face}, centre crop {r.center}, "
               f"several faces skipped {r.multiple_skipped}, unreadable {r.bad_image}")


# ---------------------------------------------------------------- data (datasets/)

@main.group("data")
def data_group():
    """Fetch public face data sets into the layout `train` and `verify` read (set FACEFUSE_DATA to
    the folder given)."""


def _digests(ctx, param, values) -> dict[str, str]:
    out = {}
    for v in values:
        name, sep, hexdigest = v.partition("=")
        if not sep or not name or not hexdigest:
            raise click.BadParameter(f"{v!r}: expected FILE=HEX (e.g. pairs.txt=ea42...)", ctx, param)
        out[name] = hexdigest
    return out


@data_group.command("lfw")
@click.argument("dir", type=click.Path(file_okay=False))
@click.option("--images", type=click.Choice(["funneled", "original", "deepfunneled"]), default="funneled", show_default=True,
              help="Which LFW image archive: funneled and original come from the figshare mirror scikit-learn "
                   "uses; deepfunneled only from LFW's own site, which no longer answers (use --url-base).")
@click.option("--url-base", help="A mirror holding the same files under their names (URL/lfw-funneled.tgz, "
                                 "URL/pairs.txt, ...), instead of the published locations.")
@click.option("--sha256", multiple=True, callback=_digests, metavar="FILE=HEX",
              help="Replace a file's pinned digest (repeatable), for a mirror of other bytes.")
@click.option("--workers", type=click.IntRange(min=0), help="Alignment processes (default: one per core; 0: none).")
@click.option("--keep-raw", is_flag=True, help="Keep the unpacked photos as DIR/lfw/raw (deleted by default).")
@click.option("--retries", type=click.IntRange(min=0), default=3, show_default=True,
              help="Retries per file after a cut connection, each resuming where it stopped.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def lfw_cmd(dir, images, url_base, sha256, workers, keep_raw, retries, as_json):
    """Download LFW (an image archive and the official pairs.txt, pairsDevTrain.txt, pairsDevTest.txt),
    check each file's pinned digest, unpack, align every photo onto the 112x112 template (MTCNN;
    an undetected face becomes a centre crop) and write DIR/lfw/lfw-112/<Name>/<Name>_NNNN.jpg with
    the pairs files beside it. Work happens in DIR/.partial: run again after a failure to resume;
    DIR/lfw appears only when complete. Then: FACEFUSE_DATA=DIR facefuse train --data DIR/lfw/lfw-112 ..."""
    from facefuse.datasets.lfw import fetch_lfw

    r = fetch_lfw(dir, images=images, url_base=url_base, sha256=sha256, workers=workers, keep_raw=keep_raw,
                  retries=retries, progress=True)
    if as_json:
        click.echo(json.dumps(r.to_dict()))
        return
    a = r.align
    got = sum(r.downloaded.values())
    click.echo(f"LFW from {r.archive} in {r.lfw}: {r.identities} identities, {a['aligned'] + a['center']} crops "
               f"({a['center']} centre crops, no face found) in {r.seconds:.1f} s; downloaded {got / 2**20:.1f} MiB"
               + (f"; raw photos in {r.lfw}/raw" if r.kept_raw else "")
               + f"\nuse it with FACEFUSE_DATA={r.dir}")


@main.group("index")
def index_group():
    """Build, extend, prune and compact an on-disk gallery (one folder: gallery.db, an SQLite
    database of identities and paths, plus the faiss index and a journal of the latest adds)."""


def _kind_names() -> str:
    from facefuse.index.search import KINDS

    return ", ".join(["auto", *KINDS.names()])


def _index_options(command):
    """Kind, build and search parameters of ``index build`` (stored in the index for searches); the
    defaults in the help are read from index.search, where they are decided."""
    from facefuse.index import search as S

    for decls, kw in reversed([
        (("--kind",), dict(default="auto", show_default=True, help=f"Index kind: {_kind_names()}. auto: flat up to "
                           f"{S.AUTO_FLAT_MAX} vectors, else ivfpq (IVF + 4-bit fast-scan PQ, exact re-ranking), "
                           f"ivfpq-sq8 when the full vectors would exceed {S.AUTO_REFINE_FLAT_MAX_BYTES >> 30} GiB.")),
        (("--nlist",), dict(type=click.IntRange(min=1), help="IVF lists (ivf: 4*sqrt(n); ivfpq*: sqrt(n), a power of 2).")),
        (("--pq-m",), dict(type=click.IntRange(min=2), help="PQ sub-quantizers, 4 bits each (default dim/8).")),
        (("--hnsw-m",), dict(type=click.IntRange(min=4), help=f"HNSW neighbours per node (default {S.HNSW_M}).")),
        (("--nprobe",), dict(type=click.IntRange(min=1), help=f"Default IVF lists visited per query ({S.NPROBE_HELP}).")),
        (("--k-factor",), dict(type=click.IntRange(min=1),
                               help=f"Default re-ranked candidates per result, ivfpq* ({S.DEFAULT_K_FACTOR}).")),
        (("--ef-search",), dict(type=click.IntRange(min=1),
                                help=f"Default HNSW candidates per query ({S.DEFAULT_EF_SEARCH}).")),
    ]):
        command = click.option(*decls, **kw)(command)
    return command


@index_group.command("build")
@click.argument("gallery_dir", type=click.Path(), required=False)
@click.option("--model", type=click.Path(), help=MODEL_HELP + " Required with GALLERY_DIR; with --embeddings, "
              "recorded (and its dimension checked) so `search` can default to it.")
@click.option("-o", "--out", required=True, type=click.Path(), help="Index folder to write.")
@click.option("--embeddings", type=click.Path(), help="Precomputed embeddings instead of GALLERY_DIR: a (n, d) float "
              ".npy, or a folder of .npy shards read in file-name order.")
@click.option("--labels", type=click.Path(), help="Identities of the --embeddings rows, in order: .txt (one per line), "
              '.json (list, or {"identities": [...], "paths": [...]}) or .npy string array (n,) or (n, 2) identity, path.')
@_index_options
@settings_options("batch_size", "workers", "flip", "skip_missing", "align")
def index_build(gallery_dir, model, out, embeddings, labels, kind, **options):
    """Enroll GALLERY_DIR (one folder per identity, or images named <identity>_<anything>.jpg), or
    precomputed --embeddings with their --labels. The index keeps --flip and --align for later adds
    and searches."""
    from facefuse import api

    settings = settings_from(options)
    if embeddings or labels:
        _check_embeddings_source("GALLERY_DIR", gallery_dir, embeddings, labels)
        if settings.align != "none":
            raise FacefuseError("--align: --embeddings are already made; give --align to `facefuse embed` "
                                "(the index then keeps it for adds and searches)")
        source = embeddings
    elif not gallery_dir or not model:
        raise FacefuseError("give GALLERY_DIR and --model, or --embeddings with --labels")
    else:
        source = gallery_dir
    m = api.load_model(model, settings) if model else None
    _, e = api.build_gallery(source, out, m, labels=labels, kind=kind, **options)
    what = "embeddings" if embeddings else "images"
    click.echo(f"indexed {e.size} {what} of {e.identities} identities ({e.kind}, dim {e.dim}) into {out}"
               + (f"; skipped {e.skipped} unreadable images" if e.skipped else ""))


@index_group.command("add")
@click.argument("index_dir", type=click.Path())
@click.argument("images", nargs=-1, type=click.Path())
@click.option("--model", type=click.Path(), help=MODEL_HELP + " Default: the one the index was built with.")
@click.option("--identity", help="Identity of every image given (default: from folder / <identity>_ file names).")
@click.option("--embeddings", type=click.Path(), help="Precomputed embeddings instead of IMAGES (as for `index build`).")
@click.option("--labels", type=click.Path(), help="Identities of the --embeddings rows (as for `index build`).")
@settings_options("batch_size", "workers")
def index_add(index_dir, images, model, identity, embeddings, labels, batch_size, workers):
    """Enroll more IMAGES (files or gallery folders), or --embeddings with --labels, into INDEX_DIR
    without rebuilding it, embedded as the index's own rows were. Concurrent adds to one index
    serialise; none is lost."""
    from facefuse import api

    gallery = api.open_gallery(index_dir, model)
    gallery.batch_size, gallery.workers = batch_size, workers
    if embeddings or labels:
        _check_embeddings_source("IMAGES", images, embeddings, labels)
        e, what = gallery.add_embeddings(embeddings, labels), "embeddings"
    elif not images:
        raise FacefuseError("give IMAGES, or --embeddings with --labels")
    else:
        e, what = gallery.add(list(images), identity=identity), "images"
    click.echo(f"added {e.added} {what}; {index_dir} now holds {e.size} images of {e.identities} identities")


def _remove_help() -> str:
    from facefuse.index.store import AUTO_COMPACT_ROWS

    return ("Remove a person or an image from INDEX_DIR. Searches stop finding them at once; their vectors, "
            "names and paths leave the files on disk at the next compaction (automatic past "
            f"{AUTO_COMPACT_ROWS:,} pending adds and removes, or `facefuse index compact`).")


@index_group.command("remove", help=_remove_help())
@click.argument("index_dir", type=click.Path())
@click.option("--identity", help="Forget this person: every image enrolled under the name.")
@click.option("--image", "path", type=click.Path(), help="Forget the face enrolled from this image path (with "
              "--identity: only that person's).")
def index_remove(index_dir, identity, path):
    from facefuse import api

    if identity is None and path is None:
        raise click.UsageError("give --identity NAME, --image PATH or both")
    n = api.open_gallery(index_dir).remove(identity=identity, image=path)
    click.echo(f"removed {n} image(s) of {identity or path} from {index_dir}; gone from searches now, "
               "from the files at the next compaction")


@index_group.command("compact")
@click.argument("index_dir", type=click.Path())
def index_compact(index_dir):
    """Fold the journal of adds and removes of INDEX_DIR into a new index generation: removed
    people leave the files on disk. Searches go on meanwhile."""
    from facefuse import api

    r = api.open_gallery(index_dir).compact()
    click.echo(f"compacted {index_dir}: {r['rows']} images in generation {r['generation']}; folded {r['folded']} "
               f"journalled, dropped {r['dropped']} removed; {r['bytes_before']} -> {r['bytes_after']} bytes "
               f"in {r['seconds']:.2f} s")


@main.command("search")
@click.argument("images", nargs=-1, required=True, type=click.Path())
@click.option("--index", "index_dir", required=True, type=click.Path(), help="Index folder from `index build`.")
@click.option("--model", type=click.Path(), help=MODEL_HELP + " Default: the one the index was built with.")
@click.option("--top-k", type=click.IntRange(min=1), default=5, show_default=True, help="Distinct identities per query.")
@click.option("--threshold", type=float,
              help="Cosine below which the answer is `unknown` (default: the model's calibrated threshold, if any).")
@click.option("--far", type=float, help="Use the model's threshold calibrated at this false accept rate.")
@click.option("--nprobe", type=click.IntRange(min=1), help="IVF lists visited per query (default: the index's own).")
@click.option("--ef-search", type=click.IntRange(min=1), help="HNSW candidates per query (default: the index's own).")
@click.option("--align", "--detect", "align", type=click.Choice([*ALIGNMENTS, AUTO]),
              help="How the query photos are brought to the face template (default: as the index's images were). "
                   "landmarks finds every face of a photo and identifies each.")
@click.option("--draw", type=click.Path(), help="Write the (one) photo with every face's box and name to this image.")
@settings_options("batch_size", "workers")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON (with landmarks: every face).")
def search_cmd(images, index_dir, model, top_k, threshold, far, nprobe, ef_search, align, draw, batch_size, workers,
               as_json):
    """Identify the faces in IMAGES (files or folders) against a gallery index: with landmark
    alignment (the index's, or --align landmarks) every face of a photo, else the photo as one face."""
    from facefuse import api

    gallery = api.open_gallery(index_dir, model)
    gallery.batch_size, gallery.workers = batch_size, workers
    if draw and (len(images) != 1 or not Path(images[0]).is_file()):
        raise FacefuseError("--draw: give exactly one photo to draw on")
    results = gallery.search(list(images), top_k=top_k, threshold=threshold, far=far, nprobe=nprobe,
                             ef_search=ef_search, align=align)
    if results and results[0].note and not results[0].faces:
        click.echo(f"warning: {results[0].note}", err=True)
    if draw:
        from facefuse.core.draw import draw_faces

        draw_faces(images[0], results[0], draw)
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in results], indent=1))
        return
    for r in results:
        for i, face in enumerate(r.faces or [r]):
            top = ", ".join(f"{m.identity} {m.score:.3f}" for m in face.matches)
            where = f"\tface {i + 1} at {','.join(str(round(v)) for v in face.box)}" if r.faces else ""
            click.echo(f"{r.path}{where}\t{face.identity}\t[{top}]")
        if r.faces == []:
            click.echo(f"{r.path}\tno face found")


@main.command("verify")
@click.argument("pairs", type=click.Path())
@click.option("--model", required=True, type=click.Path(), help=MODEL_HELP)
@click.option("--root", type=click.Path(), help="Folder the image paths are relative to (default: the pairs file's).")
@click.option("--out", type=click.Path(), help="Write per-pair scores to this CSV (streamed).")
@click.option("--threshold", type=float, help="Cosine at or above which a pair is `same` (default: the model's "
              "calibrated threshold, else with labels the best-accuracy one).")
@click.option("--far", type=float, help="Decide at the model's threshold calibrated at this false accept rate "
              "(default: the stored one nearest 1e-3).")
@click.option("--plot", type=click.Path(), help="Draw the ROC curve to this image (png, pdf, svg...).")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as one JSON object.")
@settings_options("skip_missing", "batch_size", "workers", "flip", "align", "center")
def verify_cmd(pairs, model, root, out, threshold, far, plot, as_json, **options):
    """Score every pair in PAIRS (LFW pairs.txt / pairsDev*.txt, or `path_a path_b [label]` lines).

    Progress goes to stderr on a terminal; the summary reports pairs/s."""
    from pathlib import Path

    from facefuse import api
    from facefuse.core.pairs import read_pairs
    from facefuse.verification.roc import check_plot_path, plot_roc
    from facefuse.verification.scoring import write_scores_csv

    for opt, p in (("--out", out), ("--plot", plot)):
        if p and Path(p).is_dir():
            raise FacefuseError(f"{opt} {p}: is a folder; give a file name")
    if plot:
        check_plot_path(plot)
    parsed = read_pairs(pairs, root=root)
    if plot and parsed.labels is None:
        raise FacefuseError(f"--plot needs labels, and {pairs} has none")
    report = api.load_model(model, settings_from(options)).verify_pairs(parsed, threshold=threshold, far=far,
                                                                         progress=True)
    r = report.result
    if plot:
        plot_roc(plot, r)
    if out:
        write_scores_csv(out, r, progress=True)
    summary = report.to_dict()
    if as_json:
        click.echo(json.dumps(summary))
        return
    for key, value in summary.items():
        if value is not None:
            click.echo(f"{key:<18} {value:.4f}" if isinstance(value, float) else f"{key:<18} {value}")
    if r.threshold is None:
        click.echo(f"{'no labels, ' if r.pairs.labels is None else ''}no --threshold and no calibrated threshold "
                   "in the model: scores only" + (f" (written to {out})" if out else ""))


@main.command("calibrate")
@click.argument("source", type=click.Path())
@click.option("--model", required=True, type=click.Path(), help=MODEL_HELP + " Its file is updated in place.")
@click.option("--far", "fars", type=float, multiple=True,
              help="Target false accept rate (repeatable; default 1e-2 1e-3 1e-4, those the impostor count supports).")
@click.option("--impostors", type=click.IntRange(min=1), default=1_000_000, show_default=True,
              help="Impostor pairs sampled from a folder SOURCE (all of them when there are fewer).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the impostor sample.")
@click.option("--root", type=click.Path(), help="Folder a pairs file's image paths are relative to.")
@click.option("--dry-run", is_flag=True, help="Compute and print the thresholds; do not write them into the model.")
@click.option("--json", "as_json", is_flag=True, help="Print the stored record as JSON.")
@settings_options("skip_missing", "batch_size", "workers", "flip", "align", "center")
def calibrate_cmd(source, model, fars, impostors, seed, root, dry_run, as_json, **options):
    """Calibrate decision thresholds at target false accept rates and store them in the model.

    SOURCE is a labelled pairs file (any format `verify` reads) or a folder with one sub-folder of
    images per identity (every genuine pair and a seeded sample of impostor pairs are formed)."""
    from facefuse import api

    settings = settings_from(options)
    c = api.load_model(model, settings).calibrate(source, fars=list(fars) or None, impostors=impostors, seed=seed,
                                                  root=root, write=not dry_run, progress=True)
    if as_json:
        click.echo(json.dumps(c.to_dict()))
        return
    prov = c.provenance
    click.echo(f"calibrated on {prov['source']} ({settings.describe()}): {prov['genuine_pairs']} genuine, "
               f"{prov['impostor_pairs']} impostor pairs ({prov['images']} images)")
    for e in c.at_far:
        click.echo(f"FAR {e['far']:<8g} threshold {e['threshold']:.6f}  TAR {e['tar']:.4f}  "
                   f"(realised FAR {e['realised_far']:.3g}, {e['accepted_impostors']} impostors accepted)")
    best = c.best_accuracy
    click.echo(f"best accuracy {best['accuracy']:.4f} at threshold {best['threshold']:.6f}")
    click.echo("dry run: the model was not changed" if dry_run else f"stored in {model}")


def _add_serve() -> None:
    from facefuse.serve.cli import serve_command

    main.add_command(serve_command, "serve")


_add_serve()


if __name__ == "__main__":
    main()
