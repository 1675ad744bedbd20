"""The release path: one version (pyproject.toml), a CHANGELOG.md section per release that
becomes its notes, and a workflow (.github/workflows/release.yml) that tests the wheel it
publishes, publishes with trusted publishing and pushes the image; ``make lint`` checks the
workflow with zizmor, and zizmor does fail on a broken one."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
WORKFLOW = ROOT / ".github" / "workflows" / "release.yml"
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def _release_notes() -> ModuleType:
    spec = importlib.util.spec_from_file_location("release_notes", ROOT / ".github" / "release_notes.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _project(tmp_path: Path, version: str, changelog: str) -> Path:
    (tmp_path / "pyproject.toml").write_text(f'[project]\nname = "x"\nversion = "{version}"\n')
    (tmp_path / "CHANGELOG.md").write_text(changelog)
    return tmp_path


def test_release_notes_are_the_dated_section_of_the_tags_version(tmp_path: Path) -> None:
    notes = _release_notes().notes
    changelog = "# Changelog\n\n## 1.1.0 (2027-02-01)\n\n- newer\n\n## 1.0.0 (2027-01-15)\n\n- first\n- second\n"
    root = _project(tmp_path, "1.0.0", changelog)
    assert notes("v1.0.0", root) == "- first\n- second\n"
    with pytest.raises(ValueError, match="not v \\+ the version"):
        notes("v1.1.0", root)
    _project(tmp_path, "1.2.0", changelog)
    with pytest.raises(ValueError, match=r"no section '## 1\.2\.0"):
        notes("v1.2.0", root)
    _project(tmp_path, "1.2.0", "## 1.2.0 (unreleased)\n\n- soon\n")
    with pytest.raises(ValueError, match="'unreleased', not a release date"):
        notes("v1.2.0", root)


def test_the_version_is_in_one_place() -> None:
    """pyproject.toml has it; the code reads it from the installed metadata; CHANGELOG.md has
    its section; the README's wheel name follows it."""
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert re.search(rf"^## {re.escape(VERSION)} \(", changelog, re.MULTILINE), "no CHANGELOG.md section"
    scaffold = ROOT / "host" / "testing" / "scaffold.py"  # its 0.1.0 is the new plugin's own version
    hard_coded = [
        str(path.relative_to(ROOT))
        for path in [*(ROOT / "host").rglob("*.py"), *(ROOT / "plugins").rglob("*.py")]
        if path != scaffold and re.search(rf"""["']{re.escape(VERSION)}["']""", path.read_text())
    ]
    assert not hard_coded, f"the version is written in {hard_coded}: read it with importlib.metadata"
    cli = subprocess.run([sys.executable, "-m", "extproc_host", "--version"], capture_output=True, text=True)
    assert cli.stdout.strip() == f"extproc-host {VERSION}", cli.stdout + cli.stderr
    for name in re.findall(r"extproc_host-([\d.]+)-py3-none-any\.whl", (ROOT / "README.md").read_text()):
        assert name == VERSION, f"README.md names the wheel of {name}"


def _workflow() -> dict[Any, Any]:
    loaded: dict[Any, Any] = yaml.safe_load(WORKFLOW.read_text())
    return loaded


def _steps(job: dict[str, Any]) -> str:
    return "\n".join(f"{step.get('uses', '')} {step.get('run', '')}" for step in job["steps"])


def test_the_workflow_tests_publishes_and_pushes_what_it_built() -> None:
    workflow = _workflow()
    assert workflow[True] == {"push": {"tags": ["v*"]}}  # YAML reads the key `on` as True
    assert workflow["permissions"] == {}, "every job asks for what it needs, nothing by default"
    jobs = workflow["jobs"]
    build = _steps(jobs["build"])
    assert ".github/release_notes.py" in build
    assert "python -m build" in build and "twine check" in build
    assert 'EXTPROC_TEST_WHEEL="$(ls dist/*.whl)"' in build and "tests/e2e/test_installed_wheel.py" in build

    pypi = jobs["pypi"]
    assert pypi["needs"] == "build" and pypi["environment"]["name"] == "pypi"
    assert pypi["permissions"] == {"id-token": "write"}, "trusted publishing: an OIDC token and nothing else"
    assert "pypa/gh-action-pypi-publish@" in _steps(pypi)

    image = jobs["image"]
    assert image["permissions"]["packages"] == "write"
    pushed = next(step for step in image["steps"] if "docker/build-push-action" in step.get("uses", ""))
    assert pushed["with"]["push"] is True
    meta = next(step for step in image["steps"] if step.get("id") == "meta")
    assert meta["with"]["images"] == "ghcr.io/${{ github.repository }}"

    assert set(jobs["github-release"]["needs"]) == {"pypi", "image"}
    assert "--notes-file release-notes.md" in _steps(jobs["github-release"])
    for name, job in jobs.items():
        for step in job["steps"]:
            if "uses" in step:
                assert re.fullmatch(r"[\w./-]+@[0-9a-f]{40}", step["uses"]), f"{name}: {step['uses']} is not pinned"


def test_zizmor_passes_the_workflow_and_fails_a_broken_one(tmp_path: Path) -> None:
    zizmor = shutil.which("zizmor", path=str(Path(sys.executable).parent))
    assert zizmor, "zizmor is not installed (the dev extra has it)"
    command = [zizmor, "--offline", "--strict-collection", "--quiet"]
    ok = subprocess.run([*command, str(WORKFLOW)], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    broken = tmp_path / ".github" / "workflows" / "release.yml"
    broken.parent.mkdir(parents=True)
    text = WORKFLOW.read_text()
    broken.write_text(text.replace("runs-on:", "runs-onn:", 1))
    assert subprocess.run([*command, str(broken)], capture_output=True, timeout=60).returncode != 0
    broken.write_text(re.sub(r"@[0-9a-f]{40}", "@v4", text, count=1))  # an action by a movable tag
    assert subprocess.run([*command, str(broken)], capture_output=True, timeout=60).returncode != 0
