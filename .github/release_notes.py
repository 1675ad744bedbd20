"""Print the release notes of a tag: its CHANGELOG.md section, after checking that the tag is
``v`` + the version in pyproject.toml and that the section is dated (a release, not
"unreleased"). Exit status 1 with the reason otherwise. Used by .github/workflows/release.yml;
tests/unit/test_release.py runs it.

    python .github/release_notes.py v0.1.0 > release-notes.md
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def notes(tag: str, root: Path = ROOT) -> str:
    """The CHANGELOG.md section of ``tag``'s version; ValueError saying what is wrong."""
    version = tomllib.loads((root / "pyproject.toml").read_text())["project"]["version"]
    if tag != f"v{version}":
        raise ValueError(f"tag {tag} is not v + the version in pyproject.toml ({version})")
    changelog = (root / "CHANGELOG.md").read_text()
    heading = re.search(rf"^## {re.escape(version)} \((.*?)\)\s*$", changelog, re.MULTILINE)
    if heading is None:
        raise ValueError(f"CHANGELOG.md has no section '## {version} (YYYY-MM-DD)'")
    if not re.fullmatch(r"\d{4}-\d\d-\d\d", heading.group(1)):
        raise ValueError(f"CHANGELOG.md's {version} is '{heading.group(1)}', not a release date (YYYY-MM-DD)")
    rest = changelog[heading.end() :]
    following = re.search(r"^## ", rest, re.MULTILINE)
    return rest[: following.start() if following else None].strip() + "\n"


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        sys.stdout.write(notes(argv[0]))
    except ValueError as exc:
        print(f"release_notes: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
