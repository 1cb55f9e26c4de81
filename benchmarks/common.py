"""Shared shape of every benchmark results file, and the one function that writes them.

A results file is ``benchmarks/results/<benchmark>-<device-slug>.json`` holding
``{"benchmark", "device", "versions", "settings", "results": [...]}``. Bulky per-item data (the
per-pair scores of ``lfw_protocol.py``) goes to a sidecar beside it, ``<benchmark>-<device-slug>.
scores.json``. Both are written by :func:`write_json`, atomically (``facefuse.core.files``).

No absolute path of the machine goes into a file: :func:`portable` rewrites a path under a known
root to ``<root-name>/relative/part`` and refuses any other absolute path. The roots are

- ``<data>``: the shared data folder (``$FACEFUSE_DATA``, see ``facefuse.core.paths``);
- ``<repo>``: the repository root;
- ``<tmp>``: the system temp folder;

plus any a script adds (``lfw_protocol.py``: ``<runs>``, its ``--runs`` folder). The deepest root
that holds a path names it.
"""

from __future__ import annotations

import json
import os
import platform
import re
import tempfile
from pathlib import Path, PurePosixPath

from facefuse.core.files import atomic_write_text
from facefuse.core.paths import REPO_ROOT, shared_data_dir

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SIDECAR_SUFFIX = ".scores.json"
_DRIVE = re.compile(r"^[A-Za-z]:[\\/]")  # C:\ or C:/
_HOME_SHORTHAND = re.compile(r"^~[\w.-]*(/|$)")  # ~/x, ~user/x (not "~2 GB")


def device_name(device: str = "cuda") -> str:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"


def device_slug(name: str) -> str:
    if name.startswith("cpu"):
        return f"cpu{os.cpu_count()}"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def versions() -> dict:
    out = {"python": platform.python_version()}
    for mod in ("torch", "torchvision", "triton", "onnx", "onnxruntime", "faiss", "numpy"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception as exc:  # a missing optional package is recorded, not fatal
            out[mod] = f"unavailable ({type(exc).__name__})"
    return out


def results_path(benchmark: str, device: str, out_dir: Path = RESULTS_DIR) -> Path:
    return Path(out_dir) / f"{benchmark}-{device_slug(device)}.json"


def sidecar_path(path: Path) -> Path:
    """The per-item sidecar of a results file: ``x-cpu2.json`` -> ``x-cpu2.scores.json``."""
    path = Path(path)
    return path.with_name(path.name.removesuffix(".json") + SIDECAR_SUFFIX)


def read_sidecar(path: Path) -> dict[str, dict]:
    """Row name -> that row's per-item data, from the sidecar of results file ``path`` ({} if none)."""
    side = sidecar_path(path)
    return json.loads(side.read_text())["rows"] if side.is_file() else {}


# ----------------------------------------------------------------------------------------------
# Paths
# ----------------------------------------------------------------------------------------------
def path_roots(extra: dict[str, str | Path] | None = None) -> dict[str, Path]:
    """Placeholder name -> folder, for :func:`portable`."""
    roots = {"<data>": shared_data_dir(), "<repo>": REPO_ROOT, "<tmp>": Path(tempfile.gettempdir())}
    roots.update({name: Path(p) for name, p in (extra or {}).items()})
    return roots


def is_machine_path(text: str) -> bool:
    """An absolute path of this or another machine: ``/...``, ``~...``, ``C:\\...``, or anything
    that contains the user's home folder."""
    home = str(Path.home())
    return (text.startswith(("/", "\\")) or bool(_DRIVE.match(text) or _HOME_SHORTHAND.match(text))
            or (len(home) > 1 and home in text))


def portable_path(text: str, roots: dict[str, Path]) -> str:
    """``<root>/relative`` for a path under one of ``roots`` (the deepest wins); ValueError otherwise."""
    path = os.path.expanduser(text)
    forms = {os.path.normpath(path), os.path.realpath(path)} if os.path.isabs(path) else set()
    ranked = sorted(roots.items(), key=lambda kv: -len(PurePosixPath(os.path.normpath(kv[1])).parts))
    for name, root in ranked:
        for base in {os.path.normpath(root), os.path.realpath(root)}:
            for form in forms:
                if form == base or form.startswith(base.rstrip("/") + "/"):
                    rel = os.path.relpath(form, base)
                    return name if rel == "." else f"{name}/{rel}"
    raise ValueError(f"{text!r} is an absolute path outside {', '.join(roots)}: a results file must not "
                     "hold paths of the machine (pass it relative, or under one of those folders)")


def portable(obj, roots: dict[str, Path]):
    """``obj`` with every path-like string rewritten by :func:`portable_path` (keys included)."""
    if isinstance(obj, dict):
        return {portable(k, roots): portable(v, roots) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [portable(v, roots) for v in obj]
    if isinstance(obj, os.PathLike):
        obj = os.fspath(obj)
    if isinstance(obj, str) and is_machine_path(obj):
        return portable_path(obj, roots)
    return obj


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------
def dumps(obj, width: int = 140, level: int = 0) -> str:
    """Indented JSON that stays short: a list of plain values (numbers, strings), or any list or
    object that fits in ``width`` characters, goes on one line. Long score lists thus take one line
    each, so a file diffs per row and per list."""
    flat = json.dumps(obj)
    pad = "  " * level
    plain_list = isinstance(obj, list) and not any(isinstance(v, (dict, list)) for v in obj)
    if not isinstance(obj, (dict, list)) or not obj or plain_list or len(pad) + len(flat) <= width:
        return flat if level else flat + "\n"
    inner = pad + "  "
    if isinstance(obj, dict):
        items = [f"{inner}{json.dumps(k)}: {dumps(v, width, level + 1)}" for k, v in obj.items()]
        text = "{\n" + ",\n".join(items) + f"\n{pad}}}"
    else:
        text = "[\n" + ",\n".join(inner + dumps(v, width, level + 1) for v in obj) + f"\n{pad}]"
    return text if level else text + "\n"


def write_json(path: Path, doc: dict, roots: dict[str, str | Path] | None = None) -> Path:
    """The one writer of results and sidecar files: machine paths made portable (or refused,
    before anything is written), then an atomic replace of ``path``."""
    atomic_write_text(path, dumps(portable(doc, path_roots(roots))))
    return Path(path)


def results_doc(benchmark: str, device: str, settings: dict, results: list[dict]) -> dict:
    return {"benchmark": benchmark, "device": device, "versions": versions(), "settings": settings,
            "results": results}


def write_results(benchmark: str, device: str, settings: dict, results: list[dict],
                  out_dir: Path = RESULTS_DIR) -> Path:
    """Write ``<out_dir>/<benchmark>-<device-slug>.json`` and return its path."""
    return write_json(results_path(benchmark, device, out_dir), results_doc(benchmark, device, settings, results))


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def ort_profile(model: Path, x, runs: int = 5, top: int = 8, threads: int = 0) -> list[dict]:
    """ONNX Runtime's per-operator profile of ``model`` on input ``x`` (CPU, the session options
    of :func:`facefuse.export.runtime.session_options`): for the ``top`` operator types by kernel
    time, their share of it and milliseconds per run, over ``runs`` runs after one warm-up."""
    import collections

    import onnxruntime as ort
    from facefuse.export.runtime import session_options

    with tempfile.TemporaryDirectory() as tmp:
        opts = session_options(threads)
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tmp) / "ort")
        sess = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
        feed = {sess.get_inputs()[0].name: x}
        sess.run(None, feed)
        for _ in range(runs):
            sess.run(None, feed)
        events = json.loads(Path(sess.end_profiling()).read_text())
    per_op = collections.Counter()
    for e in events:  # the warm-up run included: runs + 1 in all
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_op[e["args"]["op_name"]] += e["dur"]
    total = sum(per_op.values()) or 1
    return [{"op": op, "share": round(us / total, 3), "ms_per_run": round(us / 1e3 / (runs + 1), 3)}
            for op, us in per_op.most_common(top)]
