"""The installed product without a checkout: the project is built as a wheel, installed with
its ``demo`` extra into a fresh virtual environment outside the checkout (dependencies from the
package index, as a user gets them), and every command runs from an empty directory with no
PYTHONPATH: ``init``, ``check``, ``plugins``, ``envoy-config``, ``serve`` with ``health``,
``echo`` and a short ``demo``.

The environment is a real one rather than one borrowing the project's packages: what the wheel
ships and what its dependencies declare is what is under test (a missing package-data file or
dependency fails here). It is built once per session (``installed`` in conftest.py), with
the ``demo`` and ``testing`` extras; the doc blocks that run in an installed environment use it
too.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from installed import Installed

from extproc_host.stack import PROJECT_ROOT

pytestmark = pytest.mark.e2e

LISTENING = re.compile(r"listening on (?:http://)?(\S+:\d+)")


def _read_listening(proc: subprocess.Popen[str], timeout: float = 60) -> str:
    """The HOST:PORT from the process's ``listening on`` line (it prints nothing else first
    but log lines)."""
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:  # ends when the process exits
        seen.append(line)
        found = LISTENING.search(line)
        if found:
            return found.group(1)
    raise AssertionError(f"no 'listening on' line; exit {proc.wait(timeout)}:\n{''.join(seen)}")


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen[str]]]:
    """Processes a test starts; each is stopped (its whole group) at the end."""
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def test_the_package_is_the_installed_one(installed: Installed) -> None:
    found = subprocess.run(
        [installed.bin("python"), "-c", "import extproc_host; print(extproc_host.__file__)"],
        cwd=installed.workdir,
        env=installed.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert found.returncode == 0, found.stderr
    location = Path(found.stdout.strip())
    assert location.is_relative_to(installed.venv), location
    assert not location.is_relative_to(PROJECT_ROOT / "host")


def test_init_check_plugins_envoy_config(installed: Installed) -> None:
    for name in ("extproc-host.toml", "envoy.yaml"):
        (installed.workdir / name).unlink(missing_ok=True)
    init = installed.run("init", "--envoy")
    assert init.returncode == 0, init.stderr
    settings = installed.workdir / "extproc-host.toml"
    assert settings.read_text().startswith("# extproc-host settings")
    again = installed.run("init")
    assert again.returncode == 1 and "--force" in again.stderr

    check = installed.run("check", "--config", "extproc-host.toml")
    assert check.returncode == 0, check.stderr
    assert "route upload (path prefix /upload): file_tee" in check.stdout

    plugins = installed.run("plugins")
    assert plugins.returncode == 0, plugins.stderr
    for name in ("passthrough", "file_tee", "zstd", "replace"):
        assert name in plugins.stdout

    envoy_config = installed.run(
        "envoy-config", "--config", "extproc-host.toml", "--health-check", "2", "--listen", "127.0.0.1:18080"
    )
    assert envoy_config.returncode == 0, envoy_config.stderr
    assert "drain_seconds must be at least 5" in envoy_config.stdout
    assert envoy_config.stdout.split("\n\n", 1)[1] == (installed.workdir / "envoy.yaml").read_text().split("\n\n", 1)[1]
    validate = subprocess.run(
        [installed.bin("envoy"), "--mode", "validate", "-c", "envoy.yaml", "-l", "error"],
        cwd=installed.workdir,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert validate.returncode == 0, validate.stdout + validate.stderr


def test_serve_health_and_echo(installed: Installed, started: list[subprocess.Popen[str]]) -> None:
    (installed.workdir / "extproc-host.toml").unlink(missing_ok=True)
    assert installed.run("init").returncode == 0
    host = installed.start("--config", "extproc-host.toml", "--listen", "127.0.0.1:0")
    started.append(host)
    address = _read_listening(host)
    health = installed.run("health", address)
    assert (health.returncode, health.stdout.strip()) == (0, "SERVING"), health.stderr

    echo = installed.start("echo", "--listen", "127.0.0.1:0")
    started.append(echo)
    echo_address = _read_listening(echo)
    request = urllib.request.Request(f"http://{echo_address}/", data=b"installed", method="POST")
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.read() == b"installed"

    host.send_signal(signal.SIGINT)  # Ctrl-C: no drain delay, no open streams: exits at once
    assert host.wait(timeout=60) == 0


def test_short_demo(installed: Installed) -> None:
    results = installed.workdir / "results"
    demo = installed.run("demo", "-n", "2", "--size-mib", "2", "--results", str(results), timeout=300)
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    assert "every body came back byte for byte" in demo.stdout
    assert "tee copies 4/4" in demo.stdout
    assert (results / "rss.png").is_file() and (results / "samples.json").is_file()
