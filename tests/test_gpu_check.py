"""benchmarks/gpu_check.py as the lent GPU machine gets it: the checkout in a folder not named
facefuse, a Python whose packages hold torch and triton but neither facefuse nor faiss. The dry run of
the command written in kernels/README.md must plan every kernel step there, on CPU, in seconds."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from benchmarks import gpu_check
from benchmarks.common import portable, path_roots

ROOT = Path(__file__).resolve().parent.parent
HIDDEN = re.compile(r"^(__editable__[._])?(facefuse|faiss)", re.IGNORECASE)  # packages the device image lacks
PLAN_LINE = re.compile(r"^\[gpu_check\] plan (\S+) +(ready|skipped|FAILS): (.*)$", re.MULTILINE)


def device_command() -> str:
    """The device command of kernels/README.md: the one line in the code block after its marker."""
    text = (ROOT / "kernels" / "README.md").read_text()
    m = re.search(r"<!-- device-command[^>]*-->\s*```sh\n([^\n]+)\n```", text)
    assert m, "kernels/README.md has no device-command block"
    return m.group(1)


def copy_checkout(dst: Path) -> Path:
    """What the device tool sends: tracked files and untracked ones git does not ignore."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs the git checkout to know which files travel")
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, names):
        if (ROOT / name).is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dst / name)
    return dst


def bare_python(tmp_path: Path) -> dict:
    """Environment for a ``python3`` that is this interpreter with ``-S`` and, on PYTHONPATH, links to
    this venv's packages minus facefuse (editable finder, metadata) and faiss."""
    site = tmp_path / "site"
    site.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not HIDDEN.match(entry.name):
            (site / entry.name).symlink_to(entry)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "python3"
    shim.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -S "$@"\n')
    shim.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "TRITON_INTERPRET")}
    return dict(env, PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", PYTHONPATH=str(site),
                OUT=str(tmp_path / "out"))


def test_readme_device_command_dry_run_plans_every_kernel_step_on_a_bare_python(tmp_path):
    checkout = copy_checkout(tmp_path / "checkout")
    env = bare_python(tmp_path)
    for module in ("facefuse", "faiss"):  # the simulation holds: neither imports there
        probe = subprocess.run(["python3", "-c", f"import {module}"], cwd=tmp_path, env=env, capture_output=True)
        assert probe.returncode != 0, f"{module} is visible to the bare python"
    command = device_command()
    assert command.startswith("python3 benchmarks/gpu_check.py ")
    before = sorted(p.name for p in (checkout / "benchmarks" / "results").iterdir())

    proc = subprocess.run(["bash", "-c", command + " --dry-run"], cwd=checkout, env=env, capture_output=True,
                          text=True, timeout=300)

    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "facefuse: checkout/ linked from a temporary folder" in out
    plan = {name: (state, detail) for name, state, detail in PLAN_LINE.findall(out)}
    assert set(plan) == set(gpu_check.STEP_NAMES), out
    kernel_steps = [s.name for s in gpu_check.STEPS if "triton" in s.needs]
    assert {"kernel-tests", "bench-margin-ce", "bench-dwconv", "bench-convnext-step"} <= set(kernel_steps)
    for name in kernel_steps:
        assert plan[name][0] == "ready", (name, plan[name])
    assert int(re.match(r"(\d+) tests collected", plan["kernel-tests"][1]).group(1)) > 50
    assert plan["index-tests"][0] == "skipped" and "needs faiss" in plan["index-tests"][1]
    assert "0 failing" in out and "0 versions refused" in out
    assert sorted(p.name for p in (checkout / "benchmarks" / "results").iterdir()) == before
    assert not Path(env["OUT"]).exists()


@pytest.mark.parametrize("found, refused, unchecked", [
    ({"torch": "2.11.0+cu130", "triton": "3.6.0"}, 0, 0),
    ({"torch": "2.12.1", "triton": "3.7.0"}, 0, 2),
    ({"torch": "2.3.1", "triton": "2.3.1"}, 2, 0),
    ({"torch": "2.14.1", "triton": "unavailable (ModuleNotFoundError: x)"}, 0, 0),
])
def test_version_notes_refuse_below_the_minimum_and_warn_when_unchecked(found, refused, unchecked):
    got = gpu_check.version_notes(found)
    assert (len(got[0]), len(got[1])) == (refused, unchecked)


def test_scrubbed_output_is_portable(tmp_path):
    where = gpu_check.places(tmp_path)
    text = "\n".join([f"{gpu_check.ROOT}/tests/test_x.py:3: in f", f"{sys.prefix}/lib/site.py:1: E",
                      "/usr/lib/x86_64-linux-gnu/libcuda.so.1: not found", f"see {Path.home()}/notes",
                      "1/62 tests collected", "https://github.com/a/b"])
    lines = gpu_check._scrub(text, where).splitlines()
    assert lines[0] == "<repo>/tests/test_x.py:3: in f" and lines[1] == "<python>/lib/site.py:1: E"
    assert lines[2] == ".../libcuda.so.1: not found" and lines[4:] == ["1/62 tests collected", "https://github.com/a/b"]
    assert portable(lines, path_roots()) == lines


def test_partial_rerun_replaces_its_rows_and_keeps_the_others(tmp_path):
    path = tmp_path / "gpu_check-x.json"
    path.write_text(json.dumps({"results": [{"step": "kernel-tests", "rc": 1}, {"step": "bench-dwconv", "rc": 0}]}))
    merged = gpu_check.merge_rows(path, [{"step": "kernel-tests", "rc": 0}, {"step": "index-tests", "rc": None}])
    assert merged == [{"step": "kernel-tests", "rc": 0}, {"step": "bench-dwconv", "rc": 0},
                      {"step": "index-tests", "rc": None}]


def test_unknown_step_is_one_line_error(capsys):
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--steps", "kernel-tests,nope"])
    assert "--steps nope: unknown; choose from kernel-tests," in capsys.readouterr().err
