"""Errors in parameters: the library names Python arguments, the CLI words them as its options.

The source check reads every module outside the CLI layer with ``ast`` and fails on an error
raised with a ``--option`` in its text. The parsing of ``--config`` / ``--set`` is the CLI's job
wherever it lives (``trainer/config.py``'s ``parse_set``, ``load_config_file`` and
``resolve_config``), so those three functions are the CLI layer too."""

import ast
import re
from pathlib import Path

import click
import pytest

from facefuse.cli import option_words
from facefuse.core.errors import FacefuseError, ParameterError
from facefuse.core.settings import EmbedSettings

REPO = Path(__file__).resolve().parent.parent
LIBRARY = ("core", "trainer", "export", "index", "verification", "align", "kernels", "api.py")
CLI_LAYER = {("trainer/config.py", "parse_set"), ("trainer/config.py", "load_config_file"),
             ("trainer/config.py", "resolve_config")}
OPTION = re.compile(r"(^|[\s(`'\"])--(?!nproc_per_node)[a-z]")  # torchrun's own option is no option of ours


def _strings(node) -> list[str]:
    return [n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def _option_errors(path: Path, rel: str) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    found = []

    def visit(node, function):
        for child in ast.iter_child_nodes(node):
            name = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
            if isinstance(child, ast.Raise) and child.exc is not None and (rel, function) not in CLI_LAYER:
                worded = [s for s in _strings(child.exc) if OPTION.search(s)]
                if worded:
                    found.append(f"{rel}:{child.lineno} ({function}): {worded[0]!r}")
            visit(child, name)

    visit(tree, None)
    return found


def _library_files():
    for item in LIBRARY:
        p = REPO / item
        yield from ([p] if p.is_file() else sorted(p.rglob("*.py")) if p.is_dir() else [])


def test_no_library_error_names_a_cli_option():
    bad = [e for p in _library_files() for e in _option_errors(p, str(p.relative_to(REPO)))]
    assert not bad, "library errors worded with CLI options:\n" + "\n".join(bad)


def test_the_checker_sees_an_option(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f(x):\n    if x:\n        raise ValueError(f'--far {x}: bad')\n"
                     "    raise ValueError('far=0: fine, and the dash in a-b -- c is no option')\n")
    assert [e.split(" ", 1)[0] for e in _option_errors(probe, "probe.py")] == ["probe.py:3"]


def test_parameter_error_names_the_argument_and_value():
    e = ParameterError("far", 0.0, "a false accept rate must be in (0, 1)")
    assert str(e) == "far=0: a false accept rate must be in (0, 1)"
    assert isinstance(e, FacefuseError) and isinstance(e, ValueError) and (e.param, e.value) == ("far", 0.0)
    with pytest.raises(ParameterError, match=r"^align=sift: unknown alignment; valid: none, haar, landmarks, auto$"):
        EmbedSettings(align="sift")
    with pytest.raises(ParameterError, match=r"^batch_size=0: must be an integer >= 1$"):
        EmbedSettings().replace(batch_size=0)


@click.command()
@click.argument("images", nargs=-1)
@click.option("--far", type=float)
@click.option("--far-list", "fars", multiple=True, type=float)
@click.option("--skip-missing", is_flag=True)
@click.option("--out")
def _probe(images, far, fars, skip_missing, out):
    pass


@pytest.mark.parametrize("python,shell", [
    ("far=0: a false accept rate must be in (0, 1)", "--far 0: a false accept rate must be in (0, 1)"),
    ("fars=1e-09: below what 12 impostor pairs support", "--far-list 1e-09: below what 12 impostor pairs support"),
    ("3 missing image(s): a.jpg (skip_missing=True goes on without them)",
     "3 missing image(s): a.jpg (--skip-missing goes on without them)"),
    ("give threshold= or far=, not both", "give threshold= or --far, not both"),
    ("out=/tmp/a b/c.csv: is a folder", "--out /tmp/a b/c.csv: is a folder"),
    ("images=x.txt: no images to add", "IMAGES x.txt: no images to add"),
    ("layout=far: not ours; afar=1 neither", "layout=far: not ours; afar=1 neither"),
])
def test_cli_words_python_arguments_as_its_options(python, shell):
    assert option_words(python, _probe) == shell


@click.command()
@click.option("--top-k", type=int)
def _no_skip(top_k):
    pass


def test_a_hint_about_a_setting_the_command_lacks_is_dropped():
    python = "1 unreadable image(s): q.jpg: not an image (skip_missing=True goes on without them)"
    assert option_words(python, _no_skip) == "1 unreadable image(s): q.jpg: not an image"
    assert option_words(python, _probe).endswith("(--skip-missing goes on without them)")
