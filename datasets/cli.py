"""``facefuse data ...``: the click group the main command adds (``main.add_command(data_group, "data")``).
Parse, call :mod:`facefuse.datasets`, print; no logic here."""

from __future__ import annotations

import json

import click

from facefuse.core.errors import FacefuseError

from .lfw import ARCHIVES, PAIRS_FILES, fetch_lfw


class DataCommand(click.Command):
    """Words library errors in this command's options, as ``facefuse.cli.Command`` does (imported
    when an error happens: ``facefuse.cli`` imports this module to add the group)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except FacefuseError as exc:
            from facefuse.cli import CliError, option_words

            root = ctx.find_root()
            if root.obj and root.obj.get("debug"):
                raise
            raise CliError(option_words(str(exc), self)) from None


@click.group("data", context_settings={"help_option_names": ["-h", "--help"]})
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


@data_group.command("lfw", cls=DataCommand)
@click.argument("dir", type=click.Path(file_okay=False))
@click.option("--images", type=click.Choice(list(ARCHIVES)), default="funneled", show_default=True,
              help="Which LFW image archive: funneled and original come from the figshare mirror scikit-learn "
                   "uses; deepfunneled only from LFW's own site, which no longer answers (use --url-base).")
@click.option("--url-base", help="A mirror holding the same files under their names (URL/lfw-funneled.tgz, "
                                 f"URL/{PAIRS_FILES[0]}, ...), instead of the published locations.")
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
