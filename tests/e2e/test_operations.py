"""Metrics, JSON logs and limits through a real Envoy (envoy/full_duplex.yaml, fail_closed).

One host runs the failing plugins of tests/e2e/failing_plugins.py on the full-duplex route,
with ``max_concurrent_streams = 1``, ``max_message_bytes`` at its 4 MiB minimum, Prometheus
metrics and JSON logs.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import uuid
from pathlib import Path

import httpx
import pytest
from e2e_clients import MiB, h1_request
from ops_helpers import PausedUpload, sample, scrape, wait_until

from extproc_host.stack import Stack

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
ROUTE = "full-duplex-streamed"
HOST_CONFIG = f"""
[server]
plugin_modules = ["tests.e2e.failing_plugins"]
metrics_listen = "127.0.0.1:0"
log_format = "json"
max_concurrent_streams = 1
max_message_bytes = 4194304

[routes.{ROUTE}]
chain = ["fail_on_chunk"]
path_prefix = "/{ROUTE}"

[routes.default]
chain = ["passthrough"]
"""


@pytest.fixture(scope="module")
def ops_stack(tmp_path_factory):
    config = tmp_path_factory.mktemp("operations") / "host.toml"
    config.write_text(HOST_CONFIG)
    with Stack("envoy/full_duplex.yaml", config, host_env={"PYTHONPATH": str(ROOT)}) as stack:
        yield stack


def _json_records(stack: Stack) -> list[dict]:
    lines = stack.logs["host"].read_text().splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


def _post(stack: Stack, body: bytes, headers: dict[str, str] | None = None) -> httpx.Response | str:
    try:
        with httpx.Client(timeout=30) as client:
            return client.post(f"{stack.url}/{ROUTE}", content=body, headers=headers or {})
    except httpx.TransportError as exc:
        return f"{type(exc).__name__}: {exc}"


def test_metrics_count_streams_bytes_and_hook_calls(ops_stack):
    before = scrape(ops_stack.metrics_url)
    body = os.urandom(300_000)
    response = _post(ops_stack, body)
    assert response.status_code == 200 and hashlib.sha256(response.content).digest() == hashlib.sha256(body).digest()

    def counted():
        now = scrape(ops_stack.metrics_url)
        done = sample(now, "extproc_streams_total", route=ROUTE, outcome="ok") - sample(
            before, "extproc_streams_total", route=ROUTE, outcome="ok"
        )
        return now if done == 1 else None

    after = wait_until(counted, 10, "the stream to be counted")
    for direction in ("request", "response"):
        for way in ("in", "out"):
            labels = {"route": ROUTE, "direction": direction, "way": way}
            grown = sample(after, "extproc_body_bytes_total", **labels) - sample(
                before, "extproc_body_bytes_total", **labels
            )
            assert grown == len(body), (direction, way, grown)
    calls = {"plugin": "fail_on_chunk", "hook": "on_request_body"}
    assert sample(after, "extproc_plugin_hook_seconds_count", **calls) > sample(
        before, "extproc_plugin_hook_seconds_count", **calls
    )
    assert sample(after, "extproc_active_streams") == 0


def test_failing_plugin_is_counted_and_its_json_log_lines_carry_the_stream_id(ops_stack):
    test_id = uuid.uuid4().hex
    before = scrape(ops_stack.metrics_url)
    pieces = (bytes([65 + i]) * 16384 for i in range(6))
    outcome = _post(ops_stack, pieces, {"x-fail-on-chunk": "1", "x-test-id": test_id})
    assert isinstance(outcome, str) or outcome.status_code >= 500, outcome

    about = wait_until(lambda: [r for r in _json_records(ops_stack) if test_id in r["message"]], 10, "the failure log")
    (record,) = about
    own_stream = re.search(r"\(stream (\S+), x-test-id", record["message"])[1]
    assert (record["level"], record["stream_id"], record["route"]) == ("ERROR", own_stream, ROUTE)
    assert record["logger"].startswith("extproc_host")

    def counted():
        now = scrape(ops_stack.metrics_url)
        return (
            now
            if sample(now, "extproc_plugin_errors_total", plugin="fail_on_chunk")
            > sample(before, "extproc_plugin_errors_total", plugin="fail_on_chunk")
            else None
        )

    after = wait_until(counted, 10, "the plugin error to be counted")
    failed = sample(after, "extproc_streams_total", route=ROUTE, outcome="failed")
    assert failed - sample(before, "extproc_streams_total", route=ROUTE, outcome="failed") == 1
    # Lines not about a stream have no stream id.
    assert any(r["stream_id"] is None and "serving routes" in r["message"] for r in _json_records(ops_stack))


async def test_streams_beyond_max_concurrent_streams_are_refused(ops_stack, payload):
    body = payload(4 * MiB)
    before = await asyncio.to_thread(scrape, ops_stack.metrics_url)
    upload = PausedUpload(body.path, pause_after=1 * MiB)
    first = asyncio.create_task(h1_request(f"{ops_stack.url}/{ROUTE}", body=body, content=upload.chunks()))
    try:
        await asyncio.wait_for(upload.paused.wait(), 30)
        await asyncio.to_thread(
            wait_until, lambda: sample(scrape(ops_stack.metrics_url), "extproc_active_streams") == 1, 20, "open stream"
        )
        # The limit is 1: a second upload on the same route is refused; fail_closed answers 500.
        second = await asyncio.to_thread(_post, ops_stack, os.urandom(50_000))
        assert not isinstance(second, str) and second.status_code == 500, second
    finally:
        upload.release()
    echoed = await asyncio.wait_for(first, 60)
    assert (echoed.status, echoed.sha256) == (200, body.sha256)

    refusals = [r for r in _json_records(ops_stack) if "max_concurrent_streams" in r["message"]]
    assert refusals and refusals[-1]["level"] == "WARNING", refusals
    assert (
        f"route {ROUTE}:" in refusals[-1]["message"]
        and "limit ([server] max_concurrent_streams) is 1" in refusals[-1]["message"]
    )
    after = await asyncio.to_thread(scrape, ops_stack.metrics_url)
    refused = sample(after, "extproc_streams_total", route=ROUTE, outcome="refused")
    assert refused - sample(before, "extproc_streams_total", route=ROUTE, outcome="refused") == 1


def test_buffered_body_over_max_message_bytes_fails_closed_and_both_sides_say_why(ops_stack):
    # BUFFERED sends the whole body in one gRPC message: 6 MiB is over the host's 4 MiB limit.
    before = scrape(ops_stack.metrics_url)
    with httpx.Client(timeout=30) as client:
        small = client.post(f"{ops_stack.url}/buffered", content=b"s" * (3 * MiB))
        large = client.post(f"{ops_stack.url}/buffered", content=os.urandom(6 * MiB))
    assert small.status_code == 200 and small.content == b"s" * (3 * MiB)
    assert large.status_code == 500

    def reason():
        return [r for r in _json_records(ops_stack) if "max_message_bytes (4194304 bytes)" in r["message"]]

    (record,) = wait_until(reason, 10, "the host's warning")
    assert record["level"] == "WARNING" and record["stream_id"] and record["route"] == "default", record
    assert "the request body ended before it was complete" in record["message"]
    envoy_log = ops_stack.logs["envoy"].read_text()
    assert re.search(r"Received message larger than max \(\d+ vs\. 4194304\)", envoy_log), envoy_log[-2000:]
    after = scrape(ops_stack.metrics_url)
    aborted = {"route": "default", "outcome": "aborted"}
    assert sample(after, "extproc_streams_total", **aborted) - sample(before, "extproc_streams_total", **aborted) == 1
