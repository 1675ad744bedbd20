"""No command block of README.md or docs/ is forgotten: each is run by
tests/e2e/test_doc_commands.py (a recipe in tests/doc_recipes.py claims it) or says on its page
why not (``<!-- not-run: why -->``). The blocks not run are listed as skipped tests, so every
``make test`` (``pytest -ra``) prints them with their reasons.

Also here: what a page claims about the project that a run of its blocks cannot check (the
README's command table against the command's parser, docs/testing.md's lint commands against
the Makefile), and the block reader itself.
"""

from __future__ import annotations

import argparse
import re
import subprocess
from pathlib import Path

import pytest

from extproc_host.cli import _parser
from tests.doc_recipes import RECIPES, recipe_for
from tests.docblocks import (
    ROOT,
    code_blocks,
    command_blocks,
    console_commands,
    output_matches,
    runs_in_background,
)

BLOCKS = command_blocks()
NOT_RUN = [block for block in BLOCKS if block.not_run is not None]


def test_every_command_block_runs_or_says_why() -> None:
    problems = []
    for block in BLOCKS:
        recipe = recipe_for(block)
        if block.not_run is None and recipe is None:
            problems.append(f"{block.where}: no recipe in tests/doc_recipes.py and no <!-- not-run: why --> marker")
        if block.not_run is not None and recipe is not None:
            problems.append(f"{block.where}: marked not-run, yet a recipe claims it")
        if block.not_run is not None and len(block.not_run) < 10:
            problems.append(f"{block.where}: not-run without a reason: {block.not_run!r}")
    for recipe in RECIPES:
        claimed = [block.where for block in BLOCKS if recipe.claims(block)]
        if len(claimed) != 1:
            problems.append(f"recipe {recipe.page} {recipe.match!r} claims {claimed or 'no block'}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("block", NOT_RUN, ids=[block.where for block in NOT_RUN])
def test_blocks_not_run(block) -> None:
    first = block.code.strip().splitlines()[0]
    pytest.skip(f"{block.where} ({first[:50]}): not run: {block.not_run}")


def test_the_console_blocks_read_as_commands_and_output() -> None:
    for block in BLOCKS:
        if block.language == "console":
            assert console_commands(block.code), block.where


def test_readme_command_table_covers_every_command_and_option() -> None:
    """Each subcommand of ``extproc-host`` has a row; a row without ``...`` names every option."""
    readme = (ROOT / "README.md").read_text()
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| `extproc-host ?([a-z-]*)[^`]*`.*$", readme, re.M)}
    subparsers = next(a for a in _parser()._actions if a.dest == "command").choices
    problems = []
    for name, parser in subparsers.items():
        key = "" if name == "serve" else name
        if key not in rows:
            problems.append(f"no row for `extproc-host {name}`")
            continue
        usage = rows[key].split("|")[1]
        if "..." in usage:
            continue
        for action in parser._actions:
            documented = action.option_strings and "--help" not in action.option_strings
            if documented and action.help != argparse.SUPPRESS and not any(o in usage for o in action.option_strings):
                problems.append(f"`extproc-host {name}` row lacks {action.option_strings[-1]}")
    assert not problems, "\n".join(problems)


def _make_dry_run(target: str) -> list[str]:
    made = subprocess.run(["make", "--dry-run", "--always-make", target], cwd=ROOT, capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    return made.stdout.splitlines()


def test_testing_page_shows_the_lint_that_make_test_runs() -> None:
    """docs/testing.md's lint block is, command for command, what ``make lint`` (the first
    step of ``make test``) runs."""
    (block,) = [b for b in code_blocks("docs/testing.md") if b.is_command and "ruff" in b.code]
    shown = [line.split("  #")[0].strip() for line in block.code.splitlines() if line.strip()]
    checks = re.compile(r"\.venv/bin/(ruff|zizmor|mypy) ")
    linted = [line for line in _make_dry_run("lint") if checks.match(line)]
    assert shown == linted
    assert [line for line in _make_dry_run("test") if checks.match(line)] == linted, "make test does not lint"


_INDEX_INSTALL = re.compile(r"pip install '?extproc-host(\[[a-z,]+\])?'?(?![\w./-])|pypi\.org/project/extproc-host")


def _released() -> bool:
    """Whether CHANGELOG.md records a release (a version heading with a date)."""
    return re.search(r"^## \d+\.\d+\.\d+ \(\d{4}-\d\d-\d\d\)", (ROOT / "CHANGELOG.md").read_text(), re.M) is not None


def test_no_page_installs_an_unpublished_package_from_the_index() -> None:
    """Until a release is recorded, ``pip install extproc-host`` (which would fetch whatever
    holds that name on the index) appears only where the same paragraph says it needs the
    release, and never in a block a reader would run."""
    if _released():
        pytest.skip("CHANGELOG.md records a release: extproc-host is on the index")
    from extproc_host.testing import scaffold

    texts = {page: (ROOT / page).read_text() for page in ["README.md", *sorted(_markdown_pages())]}
    texts["the new-plugin scaffold's README"] = scaffold.README.template
    problems = []
    for where, text in texts.items():
        for paragraph in re.split(r"\n\s*\n", text):
            if _INDEX_INSTALL.search(paragraph) and not re.search(r"release|the installed extproc-host", paragraph):
                problems.append(f"{where}: {_INDEX_INSTALL.search(paragraph).group(0)!r} in: {paragraph[:120]!r}")
    for block in BLOCKS:
        for line in block.code.splitlines():
            if _INDEX_INSTALL.search(line.split("#")[0]):
                problems.append(f"{block.where}: a block installs from the index: {line!r}")
    assert not problems, "\n".join(problems)


def _markdown_pages() -> list[str]:
    pages = [p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md")]
    pages += [p.relative_to(ROOT).as_posix() for p in (ROOT / "examples").glob("*/README.md")]
    return pages


# The block reader and the output comparison, on made-up pages: a checker that cannot fail
# proves nothing.


def test_blocks_their_markers_and_titles(tmp_path: Path) -> None:
    (tmp_path / "page.md").write_text(
        "# Page\n\n"
        "<!-- not-run: needs a Docker engine -->\n```sh\ndocker compose up\n```\n\n"
        '- a list item:\n\n  ```toml title="bad.toml"\n  [routes]\n  ```\n\n'
        "~~~console\n$ echo hi\nhi\n~~~\n\n"
        "<!-- a comment that is no marker -->\n```bash\ntrue\n```\n"
    )
    blocks = code_blocks("page.md", root=tmp_path)
    assert [(b.line, b.language, b.not_run) for b in blocks] == [
        (4, "sh", "needs a Docker engine"),
        (10, "toml", None),
        (14, "console", None),
        (20, "bash", None),
    ]
    assert blocks[1].attributes == {"title": "bad.toml"} and blocks[1].code == "[routes]\n"
    assert [b.language for b in command_blocks(["page.md"], root=tmp_path)] == ["sh", "console", "bash"]


def test_console_commands_and_their_output() -> None:
    commands = console_commands("$ a --x \\\n  --y\none\ntwo\n$ b &\n$ c\n")
    assert [(c.command, c.output) for c in commands] == [("a --x \\\n  --y", "one\ntwo\n"), ("b &", ""), ("c", "")]
    with pytest.raises(ValueError, match="output before the first command"):
        console_commands("output\n$ a\n")
    assert runs_in_background("envoy -c envoy.yaml &   # Envoy") and runs_in_background("a && b &")
    assert not runs_in_background("curl -s 'x&y' # a & b") and not runs_in_background("a && b")


@pytest.mark.parametrize(
    ("expected", "printed", "same"),
    [
        ("card ****\n", "card ****", True),
        ("a\nb\n", "a  \nb\n", True),
        ("a\n...\nz\n", "a\nb\nc\nz\n", True),
        ("a\n...\nz\n", "a\nz\n", True),
        ("...\n7 passed in ...\n", "....... [100%]\n7 passed in 2.51s\n", True),
        ("...\n7 passed in ...\n", "....... [100%]\n6 passed, 1 failed in 2.51s\n", False),
        ("a\nb\n", "a\nc\n", False),
        ("a\n", "a\nmore\n", False),
        ("a\n...\nz\n", "a\nb\n", False),
        ("401\n", "", False),
    ],
)
def test_output_comparison(expected: str, printed: str, same: bool) -> None:
    assert output_matches(expected, printed) is same
