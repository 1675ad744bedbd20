"""A client that goes away mid-upload, through a real Envoy: every plugin is closed exactly
once, with an error, and never told the body ended; complete exchanges close without one."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest
from e2e_clients import abandon_upload

from extproc_host.stack import Stack

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
ROUTES = ("full-duplex-streamed", "streamed")


@pytest.fixture(scope="module")
def recording_stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("abort")
    record = tmp / "closes.jsonl"
    config = tmp / "host.toml"
    routes = "".join(f'\n[routes.{r}]\nchain = ["close_recorder"]\n' for r in ROUTES)
    config.write_text(
        f'[server]\nplugin_modules = ["tests.e2e.recording_plugins"]\n'
        f'[plugins.close_recorder]\npath = "{record}"\n{routes}\n[routes.default]\nchain = ["passthrough"]\n'
    )
    with Stack("envoy/full_duplex.yaml", config, host_env={"PYTHONPATH": str(ROOT)}) as stack:
        yield stack, record


def records(path: Path, count: int, timeout: float = 20.0) -> list[dict]:
    """Wait until ``path`` holds at least ``count`` records; return them all."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= count:
            return [json.loads(line) for line in lines]
        time.sleep(0.05)
    raise AssertionError(f"expected {count} close records in {path}, got {len(lines)}")


@pytest.mark.parametrize("route", ROUTES)
def test_abandoned_upload_closes_plugins_with_an_error(recording_stack, route):
    stack, record = recording_stack
    before = len(records(record, 0))
    abandon_upload(stack.envoy_port, f"/{route}", announced=8 * 1024 * 1024, sent=2 * 1024 * 1024)
    got = records(record, before + 1)[before:]
    assert len(got) == 1, got  # closed exactly once
    (closed,) = got
    assert closed["route"] == route
    assert closed["error"] in ("StreamAborted", "CancelledError"), closed
    assert closed["request_complete"] is False
    assert 0 < closed["request_bytes"] < 8 * 1024 * 1024


@pytest.mark.parametrize("route", ROUTES)
def test_complete_upload_closes_plugins_without_error(recording_stack, route):
    stack, record = recording_stack
    before = len(records(record, 0))
    sock = socket.create_connection(("127.0.0.1", stack.envoy_port), timeout=10)
    body = b"b" * 300_000
    sock.sendall(
        f"POST /{route} HTTP/1.1\r\nHost: test\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        + body
    )
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    sock.close()
    assert received.startswith(b"HTTP/1.1 200")
    (closed,) = records(record, before + 1)[before:]
    assert (closed["route"], closed["error"], closed["request_bytes"], closed["request_complete"]) == (
        route,
        None,
        len(body),
        True,
    ), closed
