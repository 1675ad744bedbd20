"""The fenced code blocks of the project's Markdown, as a CommonMark parser reads them
(markdown-it-py: fences inside lists, ``~~~`` fences and info strings are read as GitHub
renders them, not guessed by a regular expression).

A block's info string is its language and optional ``key="value"`` attributes:
```` ```toml title="bad.toml" ```` names the file the block is (the doc tests write it before
they run the page's commands). An HTML comment right before a block (invisible on GitHub)
says that the tests do not run it, and why::

    <!-- not-run: needs a Docker engine -->
    ```sh
    docker compose up -d
    ```
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from markdown_it import MarkdownIt

ROOT = Path(__file__).resolve().parents[1]
#: The pages whose command blocks must run (or say why not): the README and every page of docs/.
PAGES = ["README.md", *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))]
#: Info-string languages of blocks a reader types into a shell.
COMMAND_LANGUAGES = frozenset({"sh", "bash", "shell", "console"})

_NOT_RUN = re.compile(r"^<!--\s*not-run:\s*(.*?)\s*-->\s*$", re.DOTALL)
_ATTRIBUTE = re.compile(r'(\w+)="([^"]*)"')


@dataclass(frozen=True)
class Block:
    """One fenced code block of a page."""

    page: str  # relative to the repository root
    line: int  # of the opening fence, 1-based
    language: str
    code: str
    attributes: dict[str, str] = field(default_factory=dict)
    #: Why the tests do not run it (``<!-- not-run: ... -->`` before it), or None.
    not_run: str | None = None

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"

    @property
    def is_command(self) -> bool:
        return self.language in COMMAND_LANGUAGES


@cache
def _parser() -> MarkdownIt:
    return MarkdownIt("commonmark")


def code_blocks(page: str, root: Path = ROOT) -> list[Block]:
    """Every fenced block of ``page`` (a path relative to ``root``), in order."""
    tokens = _parser().parse((root / page).read_text(encoding="utf-8"))
    found = []
    for before, token in zip([None, *tokens], tokens, strict=False):
        if token.type != "fence" or token.map is None:
            continue
        language, _, rest = token.info.strip().partition(" ")
        marker = _NOT_RUN.match(before.content.strip()) if before is not None and before.type == "html_block" else None
        found.append(
            Block(
                page=page,
                line=token.map[0] + 1,
                language=language,
                code=token.content,
                attributes=dict(_ATTRIBUTE.findall(rest)),
                not_run=marker.group(1) if marker else None,
            )
        )
    return found


def command_blocks(pages: list[str] = PAGES, root: Path = ROOT) -> list[Block]:
    """The blocks of ``pages`` a reader would type into a shell."""
    return [block for page in pages for block in code_blocks(page, root) if block.is_command]


@dataclass(frozen=True)
class Command:
    """One ``$ command`` of a console block and the output shown under it."""

    command: str
    output: str  # "" when none is shown


def console_commands(code: str) -> list[Command]:
    """The commands of a console block (``$ `` prompts; a line ending in ``\\`` continues),
    each with the lines shown below it up to the next prompt."""
    commands: list[Command] = []
    lines = code.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.startswith("$ "):
            raise ValueError(f"console block: output before the first command: {line!r}")
        command = line[2:]
        while command.endswith("\\") and i + 1 < len(lines):
            i += 1
            command += "\n" + lines[i]
        output = []
        i += 1
        while i < len(lines) and not lines[i].startswith("$ "):
            output.append(lines[i])
            i += 1
        commands.append(Command(command, "\n".join(output) + "\n" if output else ""))
    return commands


def runs_in_background(command: str) -> bool:
    """Whether a shell line ends with ``&`` (before any comment)."""
    try:
        words = shlex.split(command, comments=True)
    except ValueError:
        return False
    return bool(words) and words[-1] == "&"


def output_matches(expected: str, printed: str) -> bool:
    """``printed`` is ``expected``, trailing spaces aside; a line ``...`` stands for any lines,
    ``...`` in a line for any text."""
    pattern = "".join(
        r"(?:.*\n)*?" if line == "..." else re.escape(line.rstrip()).replace(r"\.\.\.", ".*?") + r"[ \t]*\n"
        for line in expected.splitlines()
    )
    return re.fullmatch(pattern, printed if printed.endswith("\n") else printed + "\n") is not None
