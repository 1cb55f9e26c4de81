"""Docs that cannot go stale silently: every `facefuse ...` line in a code block of the README and the
docs names a command that exists and only options it takes (click's own parser reads them), every
results file a page names exists, and every results file is named by a page."""

import fnmatch
import re
import shlex
from pathlib import Path

import click
import pytest

from facefuse.cli import main

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
PAGES = sorted([REPO / "README.md", *(REPO / "docs").glob("*.md"), REPO / "benchmarks" / "README.md",
                REPO / "kernels" / "README.md", REPO / "configs" / "README.md"])
RESULT_NAME = re.compile(r"[\w.\-*\[\]]+-cpu2(?:\.scores)?\.json")


def code_lines(page: Path):
    """``(line number, text)`` of every line inside a ``` block, continuation lines joined."""
    inside, pending, start = False, "", 0
    for n, line in enumerate(page.read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            inside, pending = not inside, ""
            continue
        if not inside:
            continue
        if not pending:
            start = n
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        yield start, pending + line
        pending = ""


def facefuse_commands(pages=PAGES):
    """Every shell command of the pages that runs facefuse: ``(page, line, argv after 'facefuse')``."""
    for page in pages:
        if not page.is_file():
            continue
        for n, text in code_lines(page):
            for part in re.split(r"&&|;|\|", text.split(" #")[0]):
                words = shlex.split(part.strip(), comments=True) if part.strip() else []
                while words and ("=" in words[0] and not words[0].startswith("-")):  # VAR=value before it
                    words = words[1:]
                if words and (words[0] == "facefuse" or words[0].endswith("/facefuse")):
                    yield (page.relative_to(REPO) if page.is_relative_to(REPO) else page), n, words[1:]


COMMANDS = list(facefuse_commands())


def test_the_pages_run_facefuse_at_all():
    assert len(COMMANDS) >= 30 and any(p.name == "README.md" for p, _, _ in COMMANDS)


@pytest.mark.parametrize("page,line,argv", COMMANDS, ids=[f"{p}:{n}" for p, n, _ in COMMANDS])
def test_documented_command_and_options_exist(page, line, argv):
    cmd, name, args = main, "facefuse", list(argv)
    while isinstance(cmd, click.Group) and args and not args[0].startswith("-"):
        sub = cmd.get_command(click.Context(cmd), args[0])
        assert sub is not None, f"{page}:{line}: `{name} {args[0]}` is no facefuse command"
        cmd, name, args = sub, f"{name} {args[0]}", args[1:]
    if "--help" in args or "-h" in args:
        return
    try:
        cmd.make_parser(click.Context(cmd, info_name=name)).parse_args(args)
    except click.UsageError as exc:
        pytest.fail(f"{page}:{line}: `{name} {' '.join(args)}`: {exc.format_message()}")


def _named_results():
    for page in PAGES:
        if page.is_file():
            for m in RESULT_NAME.finditer(page.read_text()):
                yield page.relative_to(REPO), m.group(0)


def test_every_results_file_a_page_names_exists():
    missing = [f"{page}: {name}" for page, name in _named_results() if not list(RESULTS.glob(name))]
    assert not missing, "pages name results files that are not there:\n" + "\n".join(missing)


def test_every_results_file_is_named_by_a_page():
    patterns = {name for _, name in _named_results()}
    files = sorted(p.name for p in RESULTS.glob("*.json"))
    uncited = [f for f in files if not any(fnmatch.fnmatchcase(f, pat) for pat in patterns)]
    assert not uncited, "results files no page names (cite them or remove them):\n" + "\n".join(uncited)


def test_the_checker_sees_a_wrong_option_and_a_wrong_command(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("```bash\nfacefuse verify p.txt --modl m   # typo\nFOO=1 .venv/bin/facefuse serch x && ls\n"
                    "facefuse index build G \\\n  --model m -o out\n```\nfacefuse outside a block\n")
    found = [(n, argv) for _, n, argv in facefuse_commands([page])]
    assert found == [(2, ["verify", "p.txt", "--modl", "m"]), (3, ["serch", "x"]),
                     (4, ["index", "build", "G", "--model", "m", "-o", "out"])]
    cmd = main.get_command(click.Context(main), "verify")
    with pytest.raises(click.NoSuchOption):
        cmd.make_parser(click.Context(cmd)).parse_args(["p.txt", "--modl", "m"])
    assert main.get_command(click.Context(main), "serch") is None
