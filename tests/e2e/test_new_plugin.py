"""``extproc-host new-plugin``: the package it writes installs offline, its own tests pass (one of
them behind a real Envoy) and ``extproc-host plugins`` lists it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from extproc_host.stack import extproc_host_command

pytestmark = pytest.mark.e2e


def run(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def test_scaffold_install_test_and_list(tmp_path: Path) -> None:
    cli = extproc_host_command()
    made = run(*cli, "new-plugin", "word-swap", "--directory", str(tmp_path))
    assert made.returncode == 0, made.stderr
    root = tmp_path / "extproc-word-swap"
    assert (root / "src" / "extproc_word_swap" / "__init__.py").is_file()
    assert 'word-swap = "extproc_word_swap"' in (root / "pyproject.toml").read_text()

    again = run(*cli, "new-plugin", "word-swap", "--directory", str(tmp_path))
    assert again.returncode == 2
    assert "already exists" in again.stderr
    bad = run(*cli, "new-plugin", "Word Swap", "--directory", str(tmp_path))
    assert bad.returncode == 2
    assert "not a valid plugin name" in bad.stderr

    # Offline: the environment's own setuptools builds it, nothing is downloaded.
    site = tmp_path / "site"
    pip_env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1", "PIP_NO_INDEX": "1"}
    installed = run(
        sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
        "--target", str(site), str(root), env=pip_env,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stderr

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}
    tests = run(sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore", env=env, cwd=root)
    assert tests.returncode == 0, tests.stdout + tests.stderr
    assert "6 passed" in tests.stdout, tests.stdout  # the Envoy test ran, not skipped

    listed = run(*cli, "plugins", env={**env, "COLUMNS": "200"})
    assert listed.returncode == 0, listed.stderr
    assert "word-swap" in listed.stdout
    assert "extproc-word-swap" in listed.stdout
