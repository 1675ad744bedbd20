"""Scaling down loses no request: two hosts behind one real Envoy cluster with gRPC health
checks (``envoy-config --health-check``); requests go one after another while one host gets
SIGTERM, and none of them fails. The stopping host reports NOT_SERVING but keeps serving new
streams for its drain delay (``[server] drain_seconds``, sized from the health check), so Envoy
has taken it out before it refuses a stream or exits; the other host takes the traffic."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from ops_helpers import wait_until

from extproc_host.cli import main
from extproc_host.drain import drain_seconds_for
from extproc_host.stack import Stack, extproc_host_command

pytestmark = pytest.mark.e2e

INTERVAL = 0.5  # Envoy's health check interval, seconds
SETTINGS = f"""
[server]
drain_seconds = {drain_seconds_for(INTERVAL):g}
grace_seconds = 10

[routes.default]
chain = ["passthrough"]
body_mode = "FULL_DUPLEX_STREAMED"
"""
LISTENING = re.compile(r"listening on 127\.0\.0\.1:(\d+)")


@pytest.fixture
def second_host(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """A second host with the same settings on its own port: (settings file, port)."""
    config = tmp_path / "host.toml"
    config.write_text(SETTINGS)
    log = tmp_path / "second-host.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXTPROC_")}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*extproc_host_command(), "--config", str(config), "--listen", "127.0.0.1:0"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    try:
        found = wait_until(lambda: LISTENING.search(log.read_text()) or proc.poll() is not None, 60, "second host")
        assert proc.poll() is None, log.read_text()
        assert isinstance(found, re.Match)
        yield config, int(found.group(1))
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def _endpoint_requests(stack: Stack) -> dict[int, int]:
    """ext_proc streams Envoy sent to each host endpoint, by port (admin /clusters)."""
    counts = {}
    for line in stack.admin_get("/clusters").splitlines():
        found = re.fullmatch(r"extproc::127\.0\.0\.1:(\d+)::rq_total::(\d+)", line.strip())
        if found:
            counts[int(found.group(1))] = int(found.group(2))
    return counts


def test_sigterm_on_one_of_two_hosts_fails_no_request(tmp_path: Path, second_host: tuple[Path, int]) -> None:
    config, other_port = second_host
    envoy = tmp_path / "envoy.yaml"
    assert main(["envoy-config", "--config", str(config), "--health-check", f"{INTERVAL:g}", "-o", str(envoy)]) == 0

    def add_second_host(bootstrap: dict) -> None:
        (cluster,) = [c for c in bootstrap["static_resources"]["clusters"] if c["name"] == "extproc"]
        address = {"socket_address": {"address": "127.0.0.1", "port_value": other_port}}
        cluster["load_assignment"]["endpoints"][0]["lb_endpoints"].append({"endpoint": {"address": address}})

    # host_drain_seconds=None: the settings' drain delay, not the stack's default of none.
    with Stack(envoy, config, host_drain_seconds=None, envoy_edit=add_second_host) as stack:
        healthy = r"cluster\.extproc\.membership_healthy"
        wait_until(lambda: stack.envoy_stats(healthy).get("cluster.extproc.membership_healthy") == 2, 30, "2 healthy")
        statuses: list[int] = []
        wrong_bodies = 0

        with httpx.Client(timeout=30) as client:

            def one_request() -> None:
                nonlocal wrong_bodies
                body = os.urandom(16 * 1024)
                response = client.post(stack.url + "/", content=body)
                statuses.append(response.status_code)
                wrong_bodies += response.status_code == 200 and response.content != body

            for _ in range(20):
                one_request()
            before = _endpoint_requests(stack)
            assert before.get(stack.host_port, 0) > 0 and before.get(other_port, 0) > 0, before

            stack.send_signal("host", signal.SIGTERM)
            started = time.monotonic()
            while stack.exit_status("host") is None:
                assert time.monotonic() - started < 60, "the stopping host did not exit"
                one_request()
            for _ in range(20):  # after the exit: Envoy must not still point at the dead address
                one_request()
        after = _endpoint_requests(stack)
        exit_code = stack.wait_exit("host", 10)

    failures = [s for s in statuses if s != 200]
    assert not failures, f"{len(failures)} of {len(statuses)} requests failed: {sorted(set(failures))}"
    assert wrong_bodies == 0
    assert exit_code == 0
    assert len(statuses) > 40  # requests kept going through the whole drain delay
    assert after[other_port] - before[other_port] >= 20  # the other host took the traffic
