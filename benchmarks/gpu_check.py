"""One command for a lent GPU: the CUDA tests, then short sweeps of the kernel benchmarks.

It runs as the device machine gets it: a bare image whose ``python3`` holds torch, triton, pytest and
onnxruntime (CPU build) but no faiss, with this checkout in a folder not named ``facefuse`` and not
installed. So it first makes the checkout importable as ``facefuse`` without installing or fetching
anything (a link ``<tmp>/facefuse -> checkout``, first on ``sys.path`` and on every step's
``PYTHONPATH``), prints the versions it found, and plans its steps from what imports: a step whose
dependency is missing is skipped with the reason, and the others still run. Each step runs in its own
process group with a time limit taken from what is left of ``--budget`` (see STEPS for the order):

- tests on CUDA with compiled kernels: tests/test_kernel_*.py (``FACEFUSE_AUTOTUNE=0``: one config per
  kernel instead of autotuning every test shape; ``-n 4`` when pytest-xdist imports, so compiles run
  side by side), then ``-k "cuda or gpu"`` over the backbone, export and index tests;
- short sweeps of bench_margin_ce.py (filter off, and on as ``margin_ce-filter``), bench_dwconv.py and
  bench_convnext_step.py, each writing its JSON (named by the device) under benchmarks/results/.

It writes benchmarks/results/gpu_check-<device>.json (per step: command, status, exit code, seconds,
the results files it wrote, the tail of its output, machine paths scrubbed); ``--out DIR`` also gets
that file, the results files the steps wrote and the full log. ``--steps a,b`` reruns some steps and
merges their rows into an existing gpu_check file. Exit code 0 when every planned step passed, 1
otherwise. Without CUDA it runs nothing and exits 0.

``--dry-run`` (seconds, no GPU, nothing written): bootstrap, versions, the plan, test collection of
every test step and argument parsing and imports of every benchmark step. Exit code 1 when a planned
step could not start (collection error, no test selected, bad argument) or a version is one the
kernels cannot serve.

    python3 benchmarks/gpu_check.py --budget 420 --out "$OUT"   # the device command (kernels/README.md)
    python3 benchmarks/gpu_check.py --budget 420 --dry-run      # the same, proved first
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benchmarks" / "results"
XDIST_WORKERS = 4
MIN_STEP_S = 20  # a step that would get less than this is not started
# What the kernels can serve: (minimum, versions their tests passed with). Below the minimum they
# cannot run (triton < 3.0 has no tl.dot input_precision; torch 2.4 is the first paired with triton
# 3.0). Between the minimum and the checked versions the dry run warns but does not refuse.
SERVES = {"torch": ("2.4", ("2.11.0", "2.14.1")), "triton": ("3.0", ("3.6.0", "3.8.0"))}
PROBED = ("torch", "triton", "numpy", "pytest", "xdist", "onnx", "onnxscript", "onnxruntime", "faiss")


@dataclass(frozen=True)
class Step:
    name: str
    args: tuple[str, ...]  # after ``python -m pytest`` (tests) or ``python`` (benchmarks)
    needs: tuple[str, ...]  # modules that must import, else the step is skipped
    limit: int  # its own time limit in seconds
    env: dict = field(default_factory=dict)
    imports: tuple[str, ...] = ()  # a benchmark's lazy imports, checked by the dry run
    keep_as: tuple[str, str] | None = None  # (benchmark, alias): its file renamed, the one before kept
    parallel: bool = False  # tests spread over XDIST_WORKERS processes when pytest-xdist imports

    @property
    def is_test(self) -> bool:
        return not self.args[0].endswith(".py")


def _tests(name, files, limit, k=None, env=None, needs=(), parallel=False):
    args = ("-q", "-p", "no:cacheprovider", "--maxfail=5", *(("-k", k) if k else ()), *files)
    return Step(name, args, ("torch", "pytest", *needs), limit, env or {}, parallel=parallel)


def _bench(name, script, args, limit, imports, keep_as=None):
    return Step(name, (f"benchmarks/{script}", *args), ("torch", "triton"), limit, {}, imports, keep_as)


GPU = "cuda or gpu"
STEPS = [
    _tests("kernel-tests", ["tests/test_kernel_margin_ce.py", "tests/test_kernel_dwconv.py"], 150,
           env={"FACEFUSE_AUTOTUNE": "0"}, needs=("triton",), parallel=True),
    _tests("backbone-tests", ["tests/test_backbones.py"], 45, GPU, needs=("triton",)),
    _bench("bench-margin-ce", "bench_margin_ce.py",
           ["--classes", "8631", "100000", "--warmup", "10", "--rep", "50", "--bwd-reps", "5"], 90,
           ("facefuse.kernels.margin_ce", "triton.testing")),
    _bench("bench-dwconv", "bench_dwconv.py", ["--warmup", "10", "--rep", "50", "--bwd-reps", "10"], 60,
           ("facefuse.kernels.dwconv", "triton.testing")),
    _bench("bench-convnext-step", "bench_convnext_step.py", ["--batch", "64", "--warmup", "50", "--rep", "300"],
           75, ("facefuse.trainer.backbones", "facefuse.kernels.dwconv", "triton.testing")),
    _tests("export-tests", ["tests/test_export.py"], 45, GPU, needs=("onnx", "onnxruntime")),
    _bench("bench-margin-ce-filter", "bench_margin_ce.py",
           ["--classes", "100000", "--grad-filter", "--warmup", "10", "--rep", "50", "--bwd-reps", "5"], 45,
           ("facefuse.kernels.margin_ce", "triton.testing"), keep_as=("margin_ce", "margin_ce-filter")),
    _tests("index-tests", ["tests/test_index.py"], 30, GPU, needs=("faiss",)),
]
STEP_NAMES = [s.name for s in STEPS]


# ---------------------------------------------------------------------------------------------- setup
def bootstrap(link_dir: Path) -> str:
    """Make this checkout importable as ``facefuse`` here and in every step's process, installing
    nothing: unless ``import facefuse`` already finds this checkout, a link ``link_dir/facefuse``
    goes first on ``sys.path`` and ``PYTHONPATH`` (shadowing any other copy). The checkout itself
    goes on ``sys.path`` for ``benchmarks.common``, as in the other scripts. Returns how."""
    sys.path.insert(0, str(ROOT))
    if _facefuse_root() == ROOT:
        return "installed from this checkout"
    other = _facefuse_root()
    (link_dir / "facefuse").symlink_to(ROOT, target_is_directory=True)
    sys.path.insert(0, str(link_dir))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(link_dir), os.environ.get("PYTHONPATH")]))
    importlib.invalidate_caches()
    if _facefuse_root() != ROOT:
        raise SystemExit(f"gpu_check: could not make {ROOT.name}/ importable as facefuse through {link_dir}")
    return "linked from a temporary folder (not installed)" + (", shadowing another copy" if other else "")


def _facefuse_root() -> Path | None:
    spec = importlib.util.find_spec("facefuse")
    return Path(spec.origin).resolve().parent if spec and spec.origin else None


def probe() -> dict[str, str]:
    """Module -> its version, or ``unavailable (why)``: what the plan is made from."""
    found = {}
    for name in PROBED:
        try:
            found[name] = getattr(importlib.import_module(name), "__version__", "?")
        except Exception as exc:  # any failure to import is a reason to skip, recorded as such
            found[name] = f"unavailable ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    return found


def ok(found, name) -> bool:
    return not found.get(name, "unavailable").startswith("unavailable")


def extras(found) -> dict:
    """CUDA device and the runtimes' GPU support, as far as they can be read without launching work."""
    out = {"cuda_available": False, "torch_cuda": None, "device": "none"}
    if ok(found, "torch"):
        import torch

        out.update(cuda_available=torch.cuda.is_available(), torch_cuda=torch.version.cuda)
        out["device"] = torch.cuda.get_device_name() if out["cuda_available"] else "none"
    if ok(found, "onnxruntime"):
        out["ort_providers"] = __import__("onnxruntime").get_available_providers()
    if ok(found, "faiss"):
        out["faiss_gpus"] = __import__("faiss").get_num_gpus()
    return out


def version_notes(found) -> tuple[list[str], list[str]]:
    """(versions the kernels cannot serve, versions they were not checked with)."""
    refused, unchecked = [], []
    for name, (minimum, checked) in SERVES.items():
        if not ok(found, name):
            continue
        release = found[name].split("+")[0]
        if _vtuple(release) < _vtuple(minimum):
            refused.append(f"{name} {found[name]}: the kernels need >= {minimum}")
        elif release not in checked:
            unchecked.append(f"{name} {found[name]}: not checked (the tests passed with {', '.join(checked)})")
    return refused, unchecked


def _vtuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v)[:3])


def plan(found, info) -> list[dict]:
    """Per step: the step, its command line (arguments) and ``skip`` (why it cannot run, or None)."""
    rows = []
    for step in STEPS:
        missing = [n for n in step.needs if not ok(found, n)]
        skip = "needs " + "; ".join(f"{n}, {found[n]}" for n in missing) if missing else None
        args, note = list(step.args), None
        if step.name == "export-tests" and "CUDAExecutionProvider" not in info.get("ort_providers", []):
            args[args.index("-k") + 1] = f"({GPU}) and not io_binding"
            note = "onnxruntime has no CUDAExecutionProvider: the io_binding test is deselected, ORT runs on CPU"
        rows.append({"step": step, "args": args, "skip": skip, "note": note})
    return rows


def command(row, collect=False) -> list[str]:
    """The step's command (relative paths; ``-S`` passed on, so a step sees the same packages)."""
    py = [sys.executable, *(["-S"] if sys.flags.no_site else [])]
    if not row["step"].is_test:
        return [*py, *row["args"]]
    parallel = ["-n", str(XDIST_WORKERS)] if row["step"].parallel and row["xdist"] and not collect else []
    return [*py, "-m", "pytest", *parallel, *row["args"], *(["--collect-only"] if collect else [])]


def shown(cmd: list[str]) -> str:
    return shlex.join(["python", *cmd[1:]])


# ---------------------------------------------------------------------------------------------- dry run
def start_collection(row) -> subprocess.Popen:
    """Collect a test step's tests in the background (the dry run starts every collection at once)."""
    env = dict(os.environ, **row["step"].env)
    env.pop("TRITON_INTERPRET", None)
    return subprocess.Popen(command(row, collect=True), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def collected(proc: subprocess.Popen) -> tuple[bool, str]:
    """(ready, detail) of a collection: ready when it exits 0 having selected at least one test."""
    try:
        out = proc.communicate(timeout=180)[0].strip().splitlines()
    except subprocess.TimeoutExpired:
        proc.kill()
        return False, "collection did not finish in 180s"
    count = next((m.group(1) for line in reversed(out) if (m := re.search(r"(\d+)(?:/\d+)? tests? collected", line))),
                 None)
    if proc.returncode == 0 and count:
        return True, f"{count} tests collected"
    errors = [line for line in out if line.startswith(("ERROR ", "E   "))]
    return False, f"collection rc={proc.returncode}: {(errors or out or ['no output'])[-1]}"


def bench_ready(row) -> tuple[bool, str]:
    """(ready, detail) of a benchmark step: its arguments parse and its lazy imports load."""
    spec = importlib.util.spec_from_file_location(f"_gpu_check_{row['step'].name}", ROOT / row["args"][0])
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        module.parse_args(row["args"][1:])
        for name in row["step"].imports:
            importlib.import_module(name)
    except SystemExit as exc:
        return False, f"bad arguments (argparse exit {exc.code})"
    except Exception as exc:  # reported as the step's failure, not hidden
        return False, f"{type(exc).__name__}: {exc}"
    return True, "arguments parse, imports load"


# ---------------------------------------------------------------------------------------------- run
def run_step(row, limit, where) -> tuple[dict, str]:
    """Run one step in its own process group (killed whole at its limit); (row, full output)."""
    cmd = command(row)
    env = dict(os.environ, **row["step"].env)
    env.pop("TRITON_INTERPRET", None)  # compiled kernels
    before = _results_state()
    kept = _read(row)
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, rc = proc.communicate(timeout=limit)[0], proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, rc = proc.communicate()[0] + f"\n[gpu_check] killed at its {limit}s limit", "timeout"
    seconds = time.monotonic() - start
    wrote = sorted(p for p, sig in _results_state().items() if before.get(p) != sig)
    wrote = _keep_as(row, wrote, kept)
    tail = [_scrub(line, where) for line in out.strip().splitlines()[-40:]]
    status = "passed" if rc == 0 else "failed"
    print(f"[gpu_check] {row['step'].name}: {status} (rc={rc}) in {seconds:.0f}s", flush=True)
    print("\n".join(tail[-15:]), flush=True)
    return ({"step": row["step"].name, "status": status, "command": shown(cmd), "env": row["step"].env, "rc": rc,
             "seconds": round(seconds, 1), "limit_s": limit, "note": row["note"], "wrote": wrote, "tail": tail},
            f"==== {row['step'].name}: {shown(cmd)}\n{_scrub(out, where)}\n")


def _results_state() -> dict[str, tuple]:
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in RESULTS_DIR.glob("*.json")}


def _read(row) -> dict[str, bytes]:
    """Before a ``keep_as`` step: the files of its benchmark, which it would overwrite."""
    if not row["step"].keep_as:
        return {}
    return {p.name: p.read_bytes() for p in RESULTS_DIR.glob(f"{row['step'].keep_as[0]}-*.json")}


def _keep_as(row, wrote, kept) -> list[str]:
    """Rename what a ``keep_as`` step wrote (``margin_ce-<dev>`` -> ``margin_ce-filter-<dev>``) and put
    back the file it overwrote, so the two sweeps of one benchmark keep a file each."""
    if not row["step"].keep_as:
        return wrote
    from facefuse.core.files import atomic_write_text

    benchmark, alias = row["step"].keep_as
    out = []
    for name in wrote:
        if name.startswith(benchmark + "-"):
            new = alias + name[len(benchmark):]
            os.replace(RESULTS_DIR / name, RESULTS_DIR / new)
            if name in kept:
                atomic_write_text(RESULTS_DIR / name, kept[name].decode())
            name = new
        out.append(name)
    return out


_ABS_PATH = re.compile(r"(?<![\w.>/:])(?:/[\w.+@-]+)+/?")


def _scrub(text: str, where: list[tuple[str, str]]) -> str:
    """``text`` with known folders named (``<repo>``, ``<python>``, ...) and any other absolute path
    cut to ``.../last-part``: a results file holds no path of the machine."""
    for name, path in where:
        text = re.sub(re.escape(path) + r"(?![\w.-])", name, text)
    return _ABS_PATH.sub(lambda m: ".../" + m.group(0).rstrip("/").rsplit("/", 1)[-1], text)


def places(link_dir: Path) -> list[tuple[str, str]]:
    """(name, folder) pairs for :func:`_scrub`, longest folder first; the link counts as the repo."""
    pairs = [("<repo>", ROOT), ("<repo>", link_dir / "facefuse"), ("<python>", sys.prefix),
             ("<tmp>", tempfile.gettempdir()), ("<home>", Path.home())]
    found = {(name, form) for name, p in pairs for form in (str(p), os.path.realpath(p)) if len(form) > 1}
    return sorted(found, key=lambda kv: -len(kv[1]))


def merge_rows(path: Path, rows: list[dict]) -> list[dict]:
    """A partial rerun (``--steps``): its rows replace those of the same steps in ``path``."""
    if not path.is_file():
        return rows
    new = {r["step"]: r for r in rows}
    old = json.loads(path.read_text())["results"]
    merged = [new.pop(r["step"], r) for r in old]
    return merged + list(new.values())


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=float, default=420.0, help="seconds for the whole run, setup included")
    p.add_argument("--dry-run", action="store_true", help="everything but the kernels: plan, collect, parse")
    p.add_argument("--out", type=Path, help="also copy the results files and the full log here ($OUT)")
    p.add_argument("--steps", help=f"comma-separated subset, in their fixed order: {','.join(STEP_NAMES)}")
    args = p.parse_args(argv)
    chosen = args.steps.split(",") if args.steps else STEP_NAMES
    unknown = [s for s in chosen if s not in STEP_NAMES]
    if unknown:
        p.error(f"--steps {','.join(unknown)}: unknown; choose from {','.join(STEP_NAMES)}")
    args.chosen = set(chosen)
    return args


def main(argv=None) -> int:
    start = time.monotonic()
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        how = bootstrap(Path(tmp))
        return check(args, start, how, places(Path(tmp)))


def check(args, start, how, where) -> int:
    import benchmarks.common  # noqa: F401  (the run's writer: proved importable by the dry run too)

    found = probe()
    info = extras(found)
    refused, unchecked = version_notes(found)
    print(f"[gpu_check] python {sys.version.split()[0]}; facefuse: {ROOT.name}/ {how}")
    print("[gpu_check] versions: " + ", ".join(f"{k} {v}" for k, v in found.items()))
    print(f"[gpu_check] device: {info['device']} (torch CUDA {info['torch_cuda']})"
          + (f"; onnxruntime providers: {', '.join(info['ort_providers'])}" if "ort_providers" in info else ""))
    for line in refused:
        print(f"[gpu_check] version CANNOT SERVE: {line}")
    for line in unchecked:
        print(f"[gpu_check] version warning: {line}")
    rows = [r for r in plan(found, info) if r["step"].name in args.chosen]
    for r in rows:
        r["xdist"] = ok(found, "xdist")
    if args.dry_run:
        return dry_run(rows, refused)
    for r in rows:
        state = f"skipped: {r['skip']}" if r["skip"] else "planned: " + shown(command(r))
        print(f"[gpu_check] plan {r['step'].name:<24} {state}" + (f" ({r['note']})" if r["note"] else ""))
    if not info["cuda_available"]:
        print("gpu_check: no CUDA device here; nothing run (--dry-run proves the command without one).")
        return 0
    return run(args, rows, start, found, info, refused, how, where)


def dry_run(rows, refused) -> int:
    """Everything but the kernels: collect every test step (all at once) and check every benchmark
    step's arguments and imports; print the plan. Exit code 1 when a step or a version would fail."""
    running = {id(r): start_collection(r) for r in rows if not r["skip"] and r["step"].is_test}
    checks = {id(r): bench_ready(r) for r in rows if not r["skip"] and not r["step"].is_test}
    checks.update({key: collected(proc) for key, proc in running.items()})
    failing = 0
    for r in rows:
        if r["skip"]:
            state = f"skipped: {r['skip']}"
        else:
            ready, detail = checks[id(r)]
            failing += not ready
            state = f"{'ready' if ready else 'FAILS'}: {detail}; would run {shown(command(r))}"
        print(f"[gpu_check] plan {r['step'].name:<24} {state}" + (f" ({r['note']})" if r["note"] else ""))
    skipped = sum(bool(r["skip"]) for r in rows)
    print(f"gpu_check dry run: {len(rows) - skipped - failing} ready, {skipped} skipped, {failing} failing, "
          f"{len(refused)} versions refused; no kernel launched, nothing written")
    return 1 if failing or refused else 0


def run(args, rows, start, found, info, refused, how, where) -> int:
    from benchmarks.common import device_name, print_table, results_path, write_results
    from facefuse.core.files import atomic_write_text

    deadline = start + args.budget
    results, log = [], []
    for r in rows:
        name, left = r["step"].name, int(deadline - time.monotonic())
        if r["skip"] or left < MIN_STEP_S:
            why = r["skip"] or f"out of budget ({left}s left)"
            status = "skipped" if r["skip"] else "not run"
            print(f"[gpu_check] {name}: {status}, {why}", flush=True)
            results.append({"step": name, "status": status, "rc": None, "seconds": 0, "note": why})
            continue
        row, text = run_step(r, min(r["step"].limit, left), where)
        results.append(row)
        log.append(text)
    device = device_name()
    settings = dict(budget_s=args.budget, steps=[r["step"].name for r in rows], facefuse=how,
                    cuda=info["torch_cuda"], ort_providers=info.get("ort_providers"), faiss=found["faiss"],
                    versions_refused=refused, xdist_workers=XDIST_WORKERS if ok(found, "xdist") else None)
    path = results_path("gpu_check", device)
    if args.out:  # the full log first: it is what is left if anything below fails
        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out / path.name.replace(".json", ".log"), "".join(log))
    if args.chosen != set(STEP_NAMES):
        results = merge_rows(path, results)
    path = write_results("gpu_check", device, settings, results)
    print_table(results, ["step", "status", "rc", "seconds"])
    failed = [r["step"] for r in results if r["status"] in ("failed", "not run") and r["step"] in args.chosen]
    if args.out:  # the device tool brings back at most 8 files: this one, the log and 6 results
        for name in [path.name, *sorted({n for r in results for n in r.get("wrote", [])})][:7]:
            shutil.copyfile(RESULTS_DIR / name, args.out / name)
    verdict = f"FAILED or not run: {', '.join(failed)}" if failed else "every planned step passed"
    print(f"wrote {path.relative_to(ROOT)}; {verdict}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
