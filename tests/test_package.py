"""The install: one import name (`facefuse`), a wheel that holds only the package, and no bare
top-level names (`cli`, `trainer`, `kernels`, `export`, `index`) that would clash with other packages."""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BARE_NAMES = ("cli", "trainer", "kernels", "export", "index", "core")


def _run(code: str, cwd: Path, **env) -> str:
    """Run ``code`` in a fresh interpreter outside the repository (so the working directory
    cannot make a bare name importable) and return its stdout."""
    full_env = {**os.environ, "TRITON_INTERPRET": "1", **env}
    r = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=full_env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


IMPORT_ALL = """
import json, pkgutil, sys, importlib
import facefuse
names = ["facefuse"]
for m in pkgutil.walk_packages(facefuse.__path__, "facefuse."):
    importlib.import_module(m.name)
    names.append(m.name)
print(json.dumps({"modules": names,
                  "bare": sorted(n for n in sys.modules if n.split(".")[0] in %r)}))
""" % (BARE_NAMES,)


def test_importing_everything_leaves_no_bare_top_level_name(tmp_path):
    out = json.loads(_run(IMPORT_ALL, tmp_path))
    assert out["bare"] == []
    mods = set(out["modules"])
    for sub in ("facefuse.cli", "facefuse.core.errors", "facefuse.trainer.engine", "facefuse.kernels.margin_ce",
                "facefuse.export.runtime", "facefuse.index.gallery", "facefuse.trainer.backbones.convnext"):
        assert sub in mods, sub


def test_module_entry_point(tmp_path):
    r = subprocess.run([sys.executable, "-m", "facefuse.cli", "--help"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for command in ("train", "export", "verify", "search", "index"):
        assert command in r.stdout


def _source_copy(dest: Path) -> Path:
    """The files git would commit (tracked and untracked, not ignored), copied to ``dest``, so the
    wheel is built from the source alone (no stale build/ folder, no venv)."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True,
                            check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The project's wheel, built from a copy of the source with the test environment's setuptools."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs a git checkout to know the source files")
    src = _source_copy(tmp_path_factory.mktemp("src"))
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "--wheel-dir", str(out), str(src)], capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        pytest.fail(f"pip wheel failed: {r.stderr[-3000:]}")
    wheels = list(out.glob("facefuse-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_holds_only_the_facefuse_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    dist_info = {t for t in tops if t.endswith(".dist-info")}
    assert tops - dist_info == {"facefuse"}, tops
    assert "facefuse/cli.py" in names and "facefuse/kernels/margin_ce.py" in names
    for n in names:
        parts = n.split("/")
        assert not {"tests", "benchmarks", "configs", "data", ".ci", "results"} & set(parts[1:-1]), n
        assert not n.endswith((".json", ".png", ".onnx", ".pt", ".jpg")), n
    entry = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "facefuse = facefuse.cli:main" in entry


def test_wheel_installs_beside_a_package_named_kernels(wheel, tmp_path):
    """Another distribution owns the top-level name `kernels` (as one that transformers imports
    does): installing facefuse next to it must leave both importable."""
    site = tmp_path / "site"
    other = site / "kernels"
    other.mkdir(parents=True)
    (other / "__init__.py").write_text("OWNER = 'someone else'\n")
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (other / "__init__.py").read_text() == "OWNER = 'someone else'\n"
    code = ("import kernels, facefuse, facefuse.kernels.margin_ce as m, facefuse.cli;"
            "print(kernels.OWNER, facefuse.__file__, m.__name__)")
    # PYTHONPATH puts the wheel's copy ahead of the test environment's editable install
    owner_a, owner_b, facefuse_file, module = _run(code, tmp_path, PYTHONPATH=str(site)).split()
    assert (owner_a, owner_b) == ("someone", "else")
    assert Path(facefuse_file).is_relative_to(site) and module == "facefuse.kernels.margin_ce"
