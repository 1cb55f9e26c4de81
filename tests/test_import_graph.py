"""The arrows between the package's folders point one way (CONVENTIONS.md):
``cli / api -> trainer/export/index/verification -> core``, ``trainer -> kernels``, ``index -> export``
(the embedder), ``index -> verification`` (the calibrated threshold a search decides at),
``verification -> export`` (the embedder, never FAISS), ``export -> align`` (a photo's face brought to
the template), ``export -> trainer`` (rebuilding a network from a checkpoint). ``kernels``, ``core``
and ``align`` import nothing else of ours; ``index`` never reaches into ``trainer`` and ``trainer``
never into ``index``; the API imports no kernels and no CLI.
Checked on the source with ``ast`` (imports inside functions count too)."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FOLDERS = ("core", "kernels", "trainer", "export", "index", "verification", "align", "datasets", "serve")
ALLOWED = {
    "core": {"core"},
    "kernels": {"kernels"},
    "align": {"align", "core"},
    "trainer": {"trainer", "core", "kernels"},
    "export": {"export", "core", "trainer", "align"},
    "verification": {"verification", "core", "export"},
    "index": {"index", "core", "export", "verification"},
    "datasets": {"datasets", "core", "align"},
    "serve": {"serve", "api", "core", "verification"},
}
MODULES = {"api.py": {"api", "core", "trainer", "export", "index", "verification", "align", "datasets"}}


def _targets(path: Path, root: Path = REPO) -> set[tuple[str, int]]:
    """(facefuse folder imported, line) for every import in ``path`` (a file under ``root``)."""
    rel = path.relative_to(root).parts
    depth = len(rel) - 1  # package depth of the module's folder
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the module's package
                base = list(rel[:-1])[: max(0, depth - node.level + 1)]
                names = [".".join(["facefuse", *base, *(node.module or "").split(".")]).rstrip(".")]
                if not base and not node.module:
                    names = [f"facefuse.{a.name}" for a in node.names]
            else:
                names = [node.module or ""]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "facefuse" and len(parts) > 1:
                found.add((parts[1], node.lineno))
            elif parts[0] in FOLDERS + ("cli",):
                found.add((f"bare {parts[0]}", node.lineno))
    return found


@pytest.mark.parametrize("folder", FOLDERS)
def test_folder_imports_only_what_it_may(folder):
    bad = []
    if not (REPO / folder).is_dir():
        pytest.skip(f"{folder}/ is not in this checkout")
    for path in sorted((REPO / folder).rglob("*.py")):
        for target, line in _targets(path):
            if target not in ALLOWED[folder]:
                bad.append(f"{path.relative_to(REPO)}:{line} imports {target}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_root_modules_import_only_what_they_may(module):
    bad = [f"{module}:{line} imports {target}" for target, line in _targets(REPO / module)
           if target not in MODULES[module]]
    assert not bad, "\n".join(bad)


def test_checker_sees_a_forbidden_edge(tmp_path):
    """The checker itself: absolute, relative and bare imports of trainer from index are reported."""
    probe = tmp_path / "index" / "probe.py"
    probe.parent.mkdir()
    probe.write_text("from facefuse.trainer import config\nfrom ..trainer import model\nimport trainer\n"
                     "from .gallery import Gallery\n")
    assert _targets(probe, tmp_path) == {("trainer", 1), ("trainer", 2), ("bare trainer", 3), ("index", 4)}
