"""``facefuse serve``: parse options, build the app, run uvicorn on the address asked for.

``serve_command`` is registered by ``facefuse.cli`` (``main.add_command(serve_command, "serve")``)
and runs alone as ``python -m facefuse.serve``. It words library errors in its own options and
prints them as one ``error: ...`` line (exit 2). With ``--add-key NAME`` it makes an API key,
stores its digest in ``--keys FILE``, prints the key once and exits."""

from __future__ import annotations

import dataclasses
import socket
import sys

import click

from facefuse.core.errors import FacefuseError, ParameterError
from facefuse.core.settings import ALIGNMENTS

from .settings import ServeSettings

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ServeSettings) if f.default is not dataclasses.MISSING}


def _opt(name: str, **kw):
    """An option named as the setting (``max_batch`` -> ``--max-batch``), default and help from it."""
    default = _DEFAULTS.get(name)
    if default is not None and "default" not in kw and not kw.get("is_flag"):
        kw["default"] = default
        kw["show_default"] = True
    return click.option("--" + name.replace("_", "-"), name, **kw)


@click.command("serve", context_settings={"help_option_names": ["-h", "--help"]})
@_opt("model", type=click.Path(dir_okay=True), help="Model: an exported .onnx file or a checkpoint / run folder.")
@_opt("index", type=click.Path(file_okay=False), help="Gallery folder (made by `facefuse index build`).")
@_opt("host", help="Address to listen on (loopback by default; another one needs --keys).")
@_opt("port", type=int, help="Port (0: any free one, printed at start).")
@_opt("align", type=click.Choice(ALIGNMENTS), help="How a request's photo is read when it does not say: "
      "landmarks (every face, MTCNN), haar (largest face), none (the upload is an aligned crop).")
@_opt("top_k", type=int, help="Identities answered per face when a search does not say.")
@_opt("far", type=float, help="Decide at the model's threshold calibrated at this FAR.")
@_opt("threshold", type=float, help="Decide at this cosine (instead of the calibrated threshold).")
@_opt("max_batch", type=int, help="Most faces per model run (1: no micro-batching).")
@_opt("max_wait_ms", type=float, help="Longest a batch waits for requests still on their way.")
@_opt("threads", type=int, help="Threads that decode, detect faces and search.")
@_opt("max_upload_bytes", type=int, help="Largest request body.")
@_opt("max_pixels", type=int, help="Largest photo, in pixels (checked before decoding).")
@_opt("keys", type=click.Path(dir_okay=False), help="API keys file: every /v1 route then needs a key.")
@_opt("allow_no_auth", is_flag=True, help="Serve beyond loopback without keys (not advised).")
@click.option("--add-key", "add_key", metavar="NAME", help="Make a key for NAME in --keys, print it, exit.")
@click.option("--role", type=click.Choice(("read", "write")), default="write", show_default=True,
              help="With --add-key: read (verify, search, list) or write (also enrol, remove).")
@click.option("--log-level", type=click.Choice(("critical", "error", "warning", "info", "debug")),
              default="warning", show_default=True, help="uvicorn's log level.")
def serve_command(add_key, role, log_level, **options):
    """Serve verify, search, enrol and remove over HTTP, the model and gallery kept in memory."""
    try:
        if add_key is not None:
            _add_key(options.get("keys"), add_key, role)
            return
        for name in ("model", "index"):
            if options.get(name) is None:
                raise ParameterError(name, None, "required")
        _serve(ServeSettings(**{k: v for k, v in options.items() if v is not None}), log_level)
    except FacefuseError as exc:
        click.echo(f"error: {_worded(exc)}", err=True)
        sys.exit(2)


def _add_key(keys, name: str, role: str) -> None:
    from .keys import add_key

    if keys is None:
        raise ParameterError("keys", None, "--add-key needs --keys FILE to store the key's digest in")
    key = add_key(keys, name, role)
    click.echo(key)
    click.echo(f"(a {role} key for {name}: shown once; its SHA-256 is in {keys})", err=True)


def _serve(settings: ServeSettings, log_level: str) -> None:
    import uvicorn

    from .app import create_app

    app = create_app(settings)  # model and gallery load here: errors before the port opens
    sock = _listen(settings.host, settings.port)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    click.echo(f"facefuse serve: http://{shown}:{port} (model {settings.model.name}, gallery {settings.index}, "
               f"{'API keys' if settings.keys else 'no authentication'})", err=False)
    sys.stdout.flush()
    config = uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="on", timeout_graceful_shutdown=5,
                            server_header=False)
    uvicorn.Server(config).run(sockets=[sock])


def _listen(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(2048)
    except OSError as exc:
        raise ParameterError("port", port, f"cannot listen on {host}:{port} ({exc.strerror or exc})") from None
    sock.set_inheritable(True)
    return sock


def _worded(exc: FacefuseError) -> str:
    """A library message in this command's options: ``max_batch=0: ...`` -> ``--max-batch 0: ...``."""
    if isinstance(exc, ParameterError):
        option = "--" + exc.param.replace("_", "-")
        value = "" if exc.value is None else f" {exc.value}"
        return f"{option}{value}: {exc.reason}".replace("keys=FILE", "--keys FILE").replace(
            "allow_no_auth=True", "--allow-no-auth")
    return str(exc)
