"""Failure policies through a real Envoy (envoy/full_duplex.yaml, ext_proc failure_mode_allow
false): what the client and the upstream see when a plugin fails, and what the host logs.

The failing plugins live in tests/e2e/failing_plugins.py; the host loads them through
``[server] plugin_modules`` with the repository root on its PYTHONPATH. Each acts only on
requests that carry its trigger header, so every route below serves normal requests too.

What Envoy 1.40 does when the host ends a stream with a gRPC error after the request headers
went upstream (fail_closed, FULL_DUPLEX_STREAMED and STREAMED alike): it resets the upstream
request mid-body (or cancels it, when the upstream connection was still being made), so the
upstream never sees the end of the body. The client gets a 500 if no response had started;
otherwise (the echo upstream answers its headers at once, so usually) it gets the response
headers and what was echoed so far, then a reset: the connection closed under it on HTTP/1.1,
RST_STREAM on HTTP/2.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest
from e2e_clients import ROUTE_PATHS

from extproc_host.stack import Stack

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
CHAIN = '["reject_413", "fail_in_headers", "fail_on_chunk"]'
HOST_CONFIG = f"""
[server]
plugin_modules = ["tests.e2e.failing_plugins"]

[routes.full-duplex-streamed]
chain = {CHAIN}
failure_policy = "fail_closed"

[routes.streamed]
chain = {CHAIN}
failure_policy = "fail_closed"

[routes.buffered]
chain = {CHAIN}
failure_policy = "fail_closed"

[routes.headers-only]
chain = {CHAIN}
failure_policy = "fail_open"

[routes.default]
chain = {CHAIN}
failure_policy = "fail_open"
"""

PIECE = 16 * 1024  # each piece reaches the host as one request-body chunk (sent 50 ms apart)
UPSTREAM_RESETS = "cluster.upstream.upstream_cx_destroy_local_with_active_rq"
UPSTREAM_CANCELLED = "cluster.upstream.upstream_rq_cancelled"
UPSTREAM_BYTES = "cluster.upstream.upstream_cx_tx_bytes_total"
UPSTREAM_REQUESTS = "cluster.upstream.upstream_rq_total"
UPSTREAM_PENDING = "cluster.upstream.upstream_rq_pending_total"


@pytest.fixture(scope="module")
def failure_stack(tmp_path_factory):
    """Envoy + echo + a host running the failing plugins on every route."""
    config = tmp_path_factory.mktemp("failure-policy") / "host.toml"
    config.write_text(HOST_CONFIG)
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    with Stack("envoy/full_duplex.yaml", host_config=config, host_env={"PYTHONPATH": pythonpath}) as running:
        yield running


@pytest.fixture
def test_id() -> str:
    return uuid.uuid4().hex


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _pieces(count: int) -> list[bytes]:
    return [bytes([ord("a") + i]) * PIECE for i in range(count)]


@dataclass
class Outcome:
    """What the client saw: the status (None if no response), the body read, the error if any."""

    status: int | None
    body: bytes
    error: str | None

    def __str__(self) -> str:
        seen = f"status {self.status}, {len(self.body)} body bytes" if self.status else "no response"
        return seen + (f", then {self.error}" if self.error else "")


def _post(stack: Stack, path: str, content, headers: dict[str, str], http2: bool = False) -> Outcome:
    status, body = None, b""
    try:
        with httpx.Client(base_url=stack.url, http1=not http2, http2=http2, timeout=30) as client:
            with client.stream("POST", path, content=content, headers=headers) as response:
                status = response.status_code
                for data in response.iter_bytes():
                    body += data
    except httpx.TransportError as exc:
        return Outcome(status, body, f"{type(exc).__name__}: {exc}")
    return Outcome(status, body, None)


def _slowly(pieces: list[bytes]):
    for piece in pieces:
        yield piece
        time.sleep(0.05)


def _stats(stack: Stack) -> dict[str, int]:
    return stack.envoy_stats(r"^cluster\.upstream\.")


def _upstream_attempts(stats: dict[str, int]) -> int:
    """Requests Envoy sent upstream or queued for an upstream connection (a non-zero change
    means the request got as far as the upstream cluster)."""
    return stats.get(UPSTREAM_REQUESTS, 0) + stats.get(UPSTREAM_PENDING, 0)


def _upstream_requests_cut(before: dict[str, int], after: dict[str, int]) -> int:
    """Upstream requests Envoy ended before they were complete, between two stats readings."""
    return sum(after.get(k, 0) - before.get(k, 0) for k in (UPSTREAM_RESETS, UPSTREAM_CANCELLED))


def _wait_for(predicate, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (?P<level>[A-Z]+) (?P<logger>\S+): (?P<message>.*)$", re.M)


def _records_about(stack: Stack, test_id: str) -> list[re.Match[str]]:
    """The host's log records (not traceback lines) that mention this test's request."""
    text = stack.logs["host"].read_text(errors="replace")
    return [m for m in _RECORD.finditer(text) if test_id in m["message"]]


def _assert_failure_logged_once(stack: Stack, test_id: str, plugin: str, route: str) -> None:
    _wait_for(lambda: _records_about(stack, test_id))
    time.sleep(0.3)  # anything logged later about the same stream (stream end, close) is counted too
    records = _records_about(stack, test_id)
    assert len(records) == 1, "expected one log record, got:\n" + "\n".join(m[0] for m in records)
    (record,) = records
    assert record["level"] == "ERROR"
    # The plugin's own message carries the stream id it was given; the host must name that
    # stream, the route and the plugin in its own words around it.
    own = re.search(rf"{plugin} tripped in [^()]* \(stream (?P<stream>\S+), x-test-id {test_id}\)", record["message"])
    assert own, record["message"]
    host_words = record["message"].replace(own[0], "")
    assert f"'{plugin}'" in host_words, record["message"]
    assert route in host_words, record["message"]
    assert re.search(rf"\bstream {re.escape(own['stream'])}\b", host_words), record["message"]


def _assert_serves_normally(stack: Stack, route: str, http2: bool = False) -> None:
    body = os.urandom(300_000)
    outcome = _post(stack, ROUTE_PATHS[route], body, {"x-test-id": "normal"}, http2=http2)
    assert outcome.status == 200 and outcome.error is None, f"normal request on {route}: {outcome}"
    assert _sha(outcome.body) == _sha(body)


@pytest.mark.parametrize("fail_on_chunk", [1, 3])
@pytest.mark.parametrize("route", ["full-duplex-streamed", "streamed"])
def test_fail_closed_mid_body_never_delivers_a_whole_body(failure_stack, route, fail_on_chunk, test_id):
    pieces = _pieces(8)
    full = b"".join(pieces)
    before = _stats(failure_stack)
    headers = {"x-fail-on-chunk": str(fail_on_chunk), "x-test-id": test_id}
    outcome = _post(failure_stack, ROUTE_PATHS[route], _slowly(pieces), headers)
    print(f"{route}, plugin fails on chunk {fail_on_chunk}: client saw {outcome}")

    # The client is told: a 5xx, or (the response had started) a reset before the end.
    assert (outcome.status is not None and outcome.status >= 500) or outcome.error is not None, str(outcome)
    if outcome.status == 200:
        # Only what went upstream before the failing chunk came back: a strict prefix.
        assert len(outcome.body) < len(full) and full.startswith(outcome.body), str(outcome)

    # The upstream request was cut off: reset on its connection mid-body, or (when the failure
    # came while Envoy was still connecting upstream) cancelled before it was sent at all.
    # Either way the upstream never saw the end of the body.
    after = _wait_for(lambda: _upstream_requests_cut(before, s := _stats(failure_stack)) and s)
    if not after:
        now = _stats(failure_stack)
        changed = {k: now[k] - before.get(k, 0) for k in now if now[k] != before.get(k, 0)}
        pytest.fail(f"Envoy neither reset nor cancelled the upstream request; upstream stats changed: {changed}")
    assert _upstream_requests_cut(before, after) == 1
    assert after[UPSTREAM_BYTES] - before[UPSTREAM_BYTES] < len(full)

    _assert_failure_logged_once(failure_stack, test_id, "fail_on_chunk", route)
    _assert_serves_normally(failure_stack, route)


def test_fail_closed_buffered_body_answers_500_and_sends_nothing_upstream(failure_stack, test_id):
    body = os.urandom(200_000)
    before = _stats(failure_stack)
    outcome = _post(failure_stack, ROUTE_PATHS["buffered"], body, {"x-fail-on-chunk": "1", "x-test-id": test_id})
    assert outcome.status == 500, str(outcome)
    assert _upstream_attempts(_stats(failure_stack)) == _upstream_attempts(before)
    _assert_failure_logged_once(failure_stack, test_id, "fail_on_chunk", "buffered")
    _assert_serves_normally(failure_stack, "buffered")


@pytest.mark.parametrize("http2", [False, True], ids=["http1", "http2"])
@pytest.mark.parametrize("route", ["full-duplex-streamed", "streamed", "buffered"])
def test_fail_closed_in_request_headers_answers_500(failure_stack, route, http2, test_id):
    before = _stats(failure_stack)
    headers = {"x-fail-in-headers": "1", "x-test-id": test_id}
    outcome = _post(failure_stack, ROUTE_PATHS[route], b"x" * 1000, headers, http2=http2)
    assert outcome.status == 500, str(outcome)
    assert _upstream_attempts(_stats(failure_stack)) == _upstream_attempts(before)
    _assert_failure_logged_once(failure_stack, test_id, "fail_in_headers", route)
    _assert_serves_normally(failure_stack, route, http2=http2)


@pytest.mark.parametrize("http2", [False, True], ids=["http1", "http2"])
@pytest.mark.parametrize("route", ["default", "headers-only"])
def test_fail_open_in_request_headers_passes_the_exchange_untouched(failure_stack, route, http2, test_id):
    body = os.urandom(2 * 1024 * 1024 + 3)
    headers = {"x-fail-in-headers": "1", "x-test-id": test_id}
    outcome = _post(failure_stack, ROUTE_PATHS[route], body, headers, http2=http2)
    assert outcome.status == 200 and outcome.error is None, str(outcome)
    assert _sha(outcome.body) == _sha(body)
    _assert_failure_logged_once(failure_stack, test_id, "fail_in_headers", route)


def test_fail_open_mid_body_before_any_change_passes_the_rest_untouched(failure_stack, test_id):
    # fail_on_chunk changes nothing before it fails, so the host can still step aside (FD).
    pieces = _pieces(6)
    headers = {"x-fail-on-chunk": "3", "x-test-id": test_id}
    outcome = _post(failure_stack, ROUTE_PATHS["default"], _slowly(pieces), headers)
    assert outcome.status == 200 and outcome.error is None, str(outcome)
    assert _sha(outcome.body) == _sha(b"".join(pieces))
    _assert_failure_logged_once(failure_stack, test_id, "fail_on_chunk", "default")


@pytest.mark.parametrize("http2", [False, True], ids=["http1", "http2"])
@pytest.mark.parametrize("route", ["full-duplex-streamed", "streamed", "buffered", "default"])
def test_reject_answers_the_client_directly(failure_stack, route, http2, test_id):
    before = _stats(failure_stack)
    headers = {"x-reject": "too-big", "x-test-id": test_id}
    outcome = _post(failure_stack, ROUTE_PATHS[route], os.urandom(30_000), headers, http2=http2)
    assert outcome.status == 413, str(outcome)
    assert outcome.body == b"rejected: too-big\n"
    # The request never reached the upstream.
    assert _upstream_attempts(_stats(failure_stack)) == _upstream_attempts(before)
    # A rejection is an answer, not a failure: nothing logged as an error about it.
    time.sleep(0.2)
    assert [m[0] for m in _records_about(failure_stack, test_id) if m["level"] == "ERROR"] == []
    _assert_serves_normally(failure_stack, route, http2=http2)


def test_reject_sets_the_plugins_headers(failure_stack, test_id):
    with httpx.Client(base_url=failure_stack.url, timeout=30) as client:
        response = client.post(ROUTE_PATHS["streamed"], content=b"x", headers={"x-reject": "1", "x-test-id": test_id})
    assert response.status_code == 413
    assert response.headers["x-rejected-by"] == "reject_413"


def test_host_still_serves_every_route_after_the_failures(failure_stack):
    host = psutil.Process(failure_stack.pids["host"])
    assert host.is_running() and host.status() != psutil.STATUS_ZOMBIE, "the host process exited"
    for route in ROUTE_PATHS:
        _assert_serves_normally(failure_stack, route)
        _assert_serves_normally(failure_stack, route, http2=True)
