"""A fresh virtual environment with the project installed from a wheel, outside the checkout:
what a user gets (tests/e2e/test_installed_wheel.py, and the doc blocks that run in an installed
environment, tests/e2e/test_doc_commands.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from extproc_host.stack import PROJECT_ROOT

#: The extras the tests use from the installed wheel: the demo, and the plugin test kit.
EXTRAS = "demo,testing"


@dataclass
class Installed:
    """A fresh virtual environment with the wheel installed, and an empty working directory."""

    venv: Path
    workdir: Path
    env: dict[str, str]
    wheel: Path

    def bin(self, name: str) -> str:
        return str(self.venv / "bin" / name)

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """``extproc-host *args`` in the empty directory."""
        return subprocess.run(
            [self.bin("extproc-host"), *args],
            cwd=self.workdir,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def start(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [self.bin("extproc-host"), *args],
            cwd=self.workdir,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )


def clean_env(venv: Path) -> dict[str, str]:
    """The environment of a user of that venv: no PYTHONPATH, no EXTPROC_* overrides, no
    other virtual environment, the venv's bin first on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EXTPROC_", "PYTHON", "VIRTUAL_ENV"))}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


#: A wheel to test instead of one built from the checkout (the release workflow tests the very
#: wheel it publishes).
WHEEL_VARIABLE = "EXTPROC_TEST_WHEEL"


def build_wheel(dist: Path) -> Path:
    """The checkout built as a wheel in ``dist``."""
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(dist), str(PROJECT_ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = dist.glob("extproc_host-*.whl")
    return wheel


def install_fresh(root: Path) -> Installed:
    """Make a venv under ``root`` and install the wheel (``$EXTPROC_TEST_WHEEL``, or one built
    from the checkout) with :data:`EXTRAS`, dependencies from the package index as a user gets
    them."""
    given = os.environ.get(WHEEL_VARIABLE)
    wheel = Path(given).resolve() if given else build_wheel(root / "dist")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    install = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", f"{wheel}[{EXTRAS}]"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert install.returncode == 0, install.stderr[-4000:]
    workdir = root / "empty"
    workdir.mkdir()
    return Installed(venv, workdir, clean_env(venv), wheel)
