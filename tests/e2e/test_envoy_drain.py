"""deploy/envoy-drain.sh, the compose stack's Envoy entrypoint, with a real Envoy: SIGTERM with
an upload in flight drains Envoy's listeners and waits for the upload, which completes byte for
byte, then stops Envoy (exit 0). Envoy alone exits at once and cuts the body off."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_clients import MiB, h1_request
from ops_helpers import PausedUpload, wait_until

from extproc_host.stack import PROJECT_ROOT, envoy_binary, extproc_host_command

pytestmark = pytest.mark.e2e

SCRIPT = PROJECT_ROOT / "deploy" / "envoy-drain.sh"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


def _ready(admin: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/ready", timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


def _active(admin: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/stats?filter=ingress.downstream_rq_active", timeout=5) as r:
        return int(r.read().decode().rsplit(":", 1)[1])


async def test_sigterm_drains_envoy_and_the_upload_in_flight_completes(tmp_path: Path, payload, procs) -> None:
    echo_log = tmp_path / "echo.log"
    procs.append(_start([*extproc_host_command(), "echo", "--listen", "127.0.0.1:0"], echo_log))
    found = wait_until(lambda: re.search(r"listening on \S*?:(\d+)", echo_log.read_text()), 30, "the echo upstream")
    echo_port = int(found.group(1))  # type: ignore[union-attr]

    listen, admin = _free_port(), _free_port()
    config = tmp_path / "envoy.yaml"
    generate = [
        *extproc_host_command(),
        "envoy-config",
        "--no-ext-proc",
        "--listen",
        f"127.0.0.1:{listen}",
        "--admin-port",
        str(admin),
        "--upstream",
        f"127.0.0.1:{echo_port}",
        "-o",
        str(config),
    ]
    subprocess.run(generate, check=True, timeout=120)
    env = {**os.environ, "ENVOY": envoy_binary(), "ENVOY_ADMIN": f"127.0.0.1:{admin}", "DRAIN_TIMEOUT": "60"}
    envoy_log = tmp_path / "envoy.log"
    args = ["-c", str(config), "--disable-hot-restart", "-l", "warning", "--drain-strategy", "immediate"]
    script = _start(["bash", str(SCRIPT), "run", *args], envoy_log, env)
    procs.append(script)
    await asyncio.to_thread(wait_until, lambda: _ready(admin), 30, "Envoy ready")

    body = payload(4 * MiB)
    upload = PausedUpload(body.path, pause_after=1 * MiB)
    task = asyncio.create_task(h1_request(f"http://127.0.0.1:{listen}/", body=body, content=upload.chunks()))
    await asyncio.wait_for(upload.paused.wait(), 30)
    await asyncio.to_thread(wait_until, lambda: _active(admin) == 1, 30, "Envoy to have the upload")

    script.send_signal(signal.SIGTERM)  # what docker stop sends: to the entrypoint only
    await asyncio.to_thread(
        wait_until, lambda: "draining: 1 requests in flight" in envoy_log.read_text(), 30, "the drain to wait"
    )
    assert script.poll() is None and not task.done()
    upload.release()
    echoed = await asyncio.wait_for(task, 60)
    assert (echoed.status, echoed.size, echoed.sha256) == (200, body.size, body.sha256)
    assert await asyncio.to_thread(script.wait, 30) == 0
    assert "drained" in envoy_log.read_text()
