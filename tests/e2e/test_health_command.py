"""``extproc-host health``, the probe for container health checks: exit 0 and SERVING for a
running host (by TCP address, by ``0.0.0.0`` as in a container's settings, and per service),
exit 1 with the reason for an unknown service or a host that is not there; ``--wait S`` asks
until a host that is starting answers SERVING."""

from __future__ import annotations

import socket
import subprocess
import time

import pytest

from extproc_host.stack import Stack, extproc_host_command

pytestmark = pytest.mark.e2e


def probe(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*extproc_host_command(), "health", *args], capture_output=True, text=True, timeout=60)


def test_health_command_reports_a_running_host(stack: Stack) -> None:
    for address in (f"127.0.0.1:{stack.host_port}", f"0.0.0.0:{stack.host_port}"):
        result = probe(address)
        assert (result.returncode, result.stdout.strip()) == (0, "SERVING"), result.stderr
    ext_proc = probe(f"127.0.0.1:{stack.host_port}", "--service", "envoy.service.ext_proc.v3.ExternalProcessor")
    assert (ext_proc.returncode, ext_proc.stdout.strip()) == (0, "SERVING")
    unknown = probe(f"127.0.0.1:{stack.host_port}", "--service", "nope")
    assert unknown.returncode == 1 and "no service named 'nope'" in unknown.stderr


def test_health_command_fails_for_a_host_that_is_not_there() -> None:
    port = _free_port()  # a port nobody listens on
    result = probe(f"127.0.0.1:{port}", "--timeout", "2")
    assert result.returncode == 1 and "UNAVAILABLE" in result.stderr
    assert probe("not-an-address").returncode == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_health_wait_asks_until_a_starting_host_serves() -> None:
    port = _free_port()
    waiting = subprocess.Popen(
        [*extproc_host_command(), "health", "--wait", "60", f"127.0.0.1:{port}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(1)  # nothing listens yet: a plain probe would have failed by now
    assert waiting.poll() is None
    host = subprocess.Popen([*extproc_host_command(), "--listen", f"127.0.0.1:{port}"], start_new_session=True)
    try:
        out, err = waiting.communicate(timeout=60)
        assert (waiting.returncode, out.strip()) == (0, "SERVING"), err
    finally:
        host.kill()
        host.wait(timeout=30)
    started = time.monotonic()
    gone = probe(f"127.0.0.1:{port}", "--wait", "1")
    assert gone.returncode == 1 and "UNAVAILABLE" in gone.stderr
    assert 1 <= time.monotonic() - started < 30
