"""The documentation holds together: every relative link in every Markdown file of the
repository points at a file that exists, and every ``#anchor`` at a heading of the page it
names (GitHub's heading slugs); the README stays a short first read that links every page of
``docs/``, and every page links back to it.

External ``http(s)`` and ``mailto`` links are not fetched. Links inside fenced code blocks and
inline code are not links.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_MAX_BYTES = 12 * 1024
#: Directories never searched for Markdown: environments, build output, caches, results.
SKIP_DIRS = {"build", "dist", "node_modules", "__pycache__", "temp", "results", "demo-results"}

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1")
# [text](target) and ![alt](target); the target may be followed by a "title".
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # http:, https:, mailto:, ...


def markdown_files(root: Path = ROOT) -> list[Path]:
    """Every Markdown file under ``root``, skipping hidden directories (.venv, .git, ...),
    build output and result directories."""
    found = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(
            d for d in subdirs if not d.startswith(".") and d not in SKIP_DIRS and not d.endswith(".egg-info")
        )
        found.extend(Path(directory) / f for f in sorted(files) if f.endswith(".md"))
    return found


def prose_lines(text: str) -> Iterator[tuple[int, str]]:
    """``(line number, line)`` for every line outside fenced code blocks."""
    fence = ""
    for number, line in enumerate(text.splitlines(), 1):
        match = _FENCE.match(line)
        if fence:
            if match and match.group(1)[0] == fence[0] and len(match.group(1)) >= len(fence):
                fence = ""
            continue
        if match:
            fence = match.group(1)
            continue
        yield number, line


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's text: links reduced to their text, inline markup and
    punctuation other than ``-`` and ``_`` removed, lower case, each space a ``-``."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"<[^>]+>", "", text)
    text = text.strip().lower()
    text = "".join(c for c in text if c.isalnum() or c in "-_ ")
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of ``path``'s headings; a repeated slug gets ``-1``, ``-2``... as on GitHub."""
    seen: dict[str, int] = {}
    result = set()
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        match = _HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    return result


def links(path: Path) -> Iterator[tuple[int, str]]:
    """``(line number, target)`` of every Markdown link and image in ``path``'s prose."""
    for number, line in prose_lines(path.read_text(encoding="utf-8")):
        for match in _LINK.finditer(_INLINE_CODE.sub("", line)):
            yield number, match.group(1)


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    """What is wrong with ``path``'s relative links, one line per broken link."""
    problems = []
    for number, target in links(path):
        where = f"{path.relative_to(root)}:{number}: ({target})"
        if not target or _EXTERNAL.match(target):
            continue
        file_part, _, anchor = target.partition("#")
        file_part = file_part.partition("?")[0]
        if file_part.startswith("/"):
            resolved = root / file_part.lstrip("/")
        elif file_part:
            resolved = (path.parent / file_part).resolve()
        else:
            resolved = path
        if not resolved.exists():
            problems.append(f"{where} no such file: {resolved}")
            continue
        if anchor:
            if resolved.is_dir() or resolved.suffix != ".md":
                problems.append(f"{where} an anchor on something that is not a Markdown file")
            elif anchor not in anchors(resolved):
                problems.append(f"{where} no heading with anchor #{anchor} in {resolved.name}")
    return problems


MARKDOWN = markdown_files()


def test_the_usual_pages_are_found() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in MARKDOWN}
    assert {"README.md", "benchmarks/README.md", "examples/extproc-shout/README.md"} <= names
    assert {"docs/architecture.md", "docs/configuration.md", "docs/plugin-guide.md"} <= names
    assert not any(part.startswith(".") for p in MARKDOWN for part in p.relative_to(ROOT).parts)


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(path: Path) -> None:
    problems = broken_links(path)
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_readme_is_a_short_first_read() -> None:
    size = README.stat().st_size
    assert size < README_MAX_BYTES, f"README.md is {size} bytes; move details into docs/"
    first_screen = "\n".join(README.read_text(encoding="utf-8").splitlines()[:60])
    assert "make demo" in first_screen
    assert "make test" in first_screen


def test_readme_links_every_docs_page_and_each_links_back() -> None:
    readme_targets = {target.partition("#")[0] for _, target in links(README)}
    pages = sorted(DOCS.glob("*.md"))
    assert pages, "no pages in docs/"
    missing = [p.name for p in pages if f"docs/{p.name}" not in readme_targets]
    assert not missing, f"README.md does not link {missing}"
    no_way_back = [p.name for p in pages if "../README.md" not in {t.partition("#")[0] for _, t in links(p)}]
    assert not no_way_back, f"pages without a link back to the README: {no_way_back}"


@pytest.mark.parametrize(
    ("heading", "expected"),
    [
        ("Scaling out and listeners", "scaling-out-and-listeners"),
        ("Several processes on one machine: `--workers`", "several-processes-on-one-machine---workers"),
        ("file_tee: copy bodies to files", "file_tee-copy-bodies-to-files"),
        ("Body modes from the chain's needs (`make bench-modes`)", "body-modes-from-the-chains-needs-make-bench-modes"),
        ("The files in envoy/", "the-files-in-envoy"),
        ("See [the guide](docs/x.md)", "see-the-guide"),
    ],
)
def test_slugs_follow_github(heading: str, expected: str) -> None:
    assert slug(heading) == expected


def test_the_checker_finds_broken_links(tmp_path: Path) -> None:
    """A checker that cannot fail proves nothing: broken files and anchors are reported,
    good ones, duplicates numbered GitHub's way, code and external links are not."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text("# Page\n\n## Part\n\n## Part\n\n```\n# not a heading\n```\n")
    readme = tmp_path / "README.md"
    readme.write_text(
        "# Top\n\n"
        "[ok](docs/page.md) [ok](docs/page.md#part) [ok](docs/page.md#part-1) [ok](#top)\n"
        "[web](https://example.com/nowhere) `[code](missing.md)`\n"
        "```\n[fenced](missing.md)\n```\n"
        "[bad file](docs/missing.md) [bad anchor](docs/page.md#part-2) [bad here](#nowhere)\n"
        "[not a heading](docs/page.md#not-a-heading) ![bad image](docs/missing.png)\n"
    )
    problems = broken_links(readme, root=tmp_path)
    assert len(problems) == 5, problems
    assert "docs/missing.md" in problems[0] and "#part-2" in problems[1] and "#nowhere" in problems[2]
    assert "#not-a-heading" in problems[3] and "missing.png" in problems[4]
    assert [p.name for p in markdown_files(tmp_path)] == ["README.md", "page.md"]
