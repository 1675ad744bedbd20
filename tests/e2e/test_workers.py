"""``--workers N``: several host processes on one port behind a real Envoy, and the
supervisor's life cycle (ready line, signals, a dying worker, a taken port).

Only processes this test started are looked at: the supervisor and its own children.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import urllib.request
from pathlib import Path

import psutil
import pytest
from e2e_clients import KiB, h1_request

from extproc_host.stack import Stack, extproc_host_command

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
PYTHONPATH = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))

HOST_CONFIG = """
[server]
plugin_modules = ["tests.e2e.worker_plugins"]
log_level = "warning"

[routes.full-duplex-streamed]
chain = ["worker_pid"]

[routes.default]
chain = ["worker_pid"]
"""

LISTENING = re.compile(r"listening on 127\.0\.0\.1:(\d+)")


def recycle_extproc_connections(config: dict) -> None:
    """Envoy opens one HTTP/2 connection per worker thread to a cluster and keeps it: make it
    open a new one every 2 streams, so that SO_REUSEPORT spreads many connections."""
    for cluster in config["static_resources"]["clusters"]:
        if cluster["name"] == "extproc":
            options = cluster["typed_extension_protocol_options"][
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
            ]
            options["common_http_protocol_options"] = {"max_requests_per_connection": 2}


def _children(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children()


def test_two_workers_share_the_streams_and_stop_cleanly(tmp_path: Path, payload) -> None:
    config = tmp_path / "host.toml"
    config.write_text(HOST_CONFIG)
    body = payload(64 * KiB)
    with Stack(
        "envoy/full_duplex.yaml",
        host_config=config,
        host_args=["--workers", "2"],
        host_env={"PYTHONPATH": PYTHONPATH},
        concurrency=2,
        envoy_edit=recycle_extproc_connections,
    ) as stack:
        supervisor = psutil.Process(stack.pids["host"])
        workers = supervisor.children()
        assert len(workers) == 2
        worker_pids = {str(w.pid) for w in workers}

        async def many() -> list:
            limit = asyncio.Semaphore(8)

            async def one():
                async with limit:
                    return await h1_request(stack.url + "/full-duplex-streamed", body=body)

            return await asyncio.gather(*(one() for _ in range(60)))

        echoed = asyncio.run(many())
        assert [e.status for e in echoed] == [200] * 60
        assert all(e.size == body.size and e.sha256 == body.sha256 for e in echoed)
        served_by = {e.headers.get("x-worker-pid") for e in echoed}
        assert served_by == worker_pids, stack.log_tails()

        # The supervisor exits 0 only when every worker did.
        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(timeout=30) == 0
        _, alive = psutil.wait_procs(workers, timeout=10)
        assert not alive


def test_workers_restarted_with_envoy_connected_listen_at_once(tmp_path: Path, payload) -> None:
    """The workers close Envoy's connections when they stop, which leaves them in TIME_WAIT on
    the host's port: the restarted supervisor must still take the port (its probe binds with
    SO_REUSEADDR, as the workers do), not refuse it for a minute."""
    config = tmp_path / "host.toml"
    config.write_text(HOST_CONFIG)
    body = payload(64 * KiB)
    with Stack(
        "envoy/full_duplex.yaml", host_config=config, host_args=["--workers", "2"], host_env={"PYTHONPATH": PYTHONPATH}
    ) as stack:

        async def some() -> list:
            return await asyncio.gather(
                *(h1_request(stack.url + "/full-duplex-streamed", body=body) for _ in range(10))
            )

        assert [e.status for e in asyncio.run(some())] == [200] * 10
        # A connection the host closes first (garbage: GOAWAY, then its FIN) stays in TIME_WAIT
        # on the host's port, whoever closes Envoy's connections at shutdown.
        with socket.create_connection(("127.0.0.1", stack.host_port)) as raw:
            raw.sendall(b"GET / HTTP/1.1\r\n\r\n")
            raw.settimeout(5)
            while raw.recv(65536):
                pass
        stack.send_signal("host", signal.SIGTERM)
        assert stack.wait_exit("host", timeout=30) == 0
        port = stack.host_port
        waiting = [
            c for c in psutil.net_connections("tcp") if c.laddr and c.laddr.port == port and c.status == "TIME_WAIT"
        ]
        assert waiting, "no connection of the stopped host in TIME_WAIT: nothing to show"
        stack.restart_host()  # raises when the host does not listen on the same port
        echoed = asyncio.run(some())
        assert [(e.status, e.sha256) for e in echoed] == [(200, body.sha256)] * 10


def _start_supervisor(tmp_path: Path, *args: str) -> tuple[subprocess.Popen[str], int]:
    config = tmp_path / "host.toml"
    config.write_text('[server]\nlog_level = "warning"\ndrain_seconds = 0\n')  # nothing health-checks these
    proc = subprocess.Popen(
        [*extproc_host_command(), "--config", str(config), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    line = proc.stdout.readline()
    match = LISTENING.search(line)
    if not match:
        proc.kill()
        pytest.fail(f"no listening line: {line!r} {proc.communicate(timeout=10)}")
    return proc, int(match.group(1))


def _kill_group(proc: subprocess.Popen[str]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_a_worker_that_dies_stops_the_supervisor_with_status_1(tmp_path: Path) -> None:
    proc, port = _start_supervisor(tmp_path, "--listen", "127.0.0.1:0", "--workers", "2")
    try:
        workers = _children(proc.pid)
        assert len(workers) == 2
        # The port accepts connections while the workers run.
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
        workers[0].kill()
        assert proc.wait(timeout=30) == 1
        assert "exited unexpectedly" in proc.stderr.read()
        _, alive = psutil.wait_procs(workers, timeout=10)
        assert not alive
    finally:
        _kill_group(proc)


def test_workers_die_with_a_killed_supervisor(tmp_path: Path) -> None:
    proc, _ = _start_supervisor(tmp_path, "--listen", "127.0.0.1:0", "--workers", "2")
    try:
        workers = _children(proc.pid)
        proc.kill()
        proc.wait(timeout=10)
        _, alive = psutil.wait_procs(workers, timeout=20)
        assert not alive
    finally:
        _kill_group(proc)


def test_workers_refuse_a_port_already_taken(tmp_path: Path) -> None:
    taken = socket.socket()
    taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # even a reuseport socket
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        port = taken.getsockname()[1]
        result = subprocess.run(
            [*extproc_host_command(), "--listen", f"127.0.0.1:{port}", "--workers", "2"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 1
        assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    finally:
        taken.close()


def test_workers_need_a_tcp_address(tmp_path: Path) -> None:
    result = subprocess.run(
        [*extproc_host_command(), "--listen", f"unix:{tmp_path}/host.sock", "--workers", "2"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "server.workers" in result.stderr and "TCP" in result.stderr


def test_each_worker_serves_its_own_metrics(tmp_path: Path) -> None:
    config = tmp_path / "host.toml"
    config.write_text('[server]\nlog_level = "warning"\nmetrics_listen = "127.0.0.1:0"\ndrain_seconds = 0\n')
    proc = subprocess.Popen(
        [*extproc_host_command(), "--config", str(config), "--listen", "127.0.0.1:0", "--workers", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        lines = []
        while not any(LISTENING.search(line) for line in lines):
            line = proc.stdout.readline()
            if not line:
                pytest.fail(f"no listening line after {lines!r}: {proc.communicate(timeout=10)}")
            lines.append(line)
        urls = {m.group(1) for line in lines if (m := re.search(r"metrics on (http://\S+/metrics)", line))}
        assert len(urls) == 2, lines  # one Prometheus target per worker
        for url in urls:
            with urllib.request.urlopen(url, timeout=10) as response:
                assert "extproc_active_streams" in response.read().decode()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        _kill_group(proc)
