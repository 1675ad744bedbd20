"""OpenTelemetry traces through a real Envoy: the host's spans reach an OTLP collector (a receiver
in this test, serving OTLP/gRPC as a collector does), in the trace of the client's
``traceparent``: a span per ext_proc stream whose parent is the client's span, a child span per
plugin hook call, and events for a rejection and a plugin failure.
"""

from __future__ import annotations

import os
import secrets
import urllib.request
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from ops_helpers import wait_until

from extproc_host.stack import Stack

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
PYTHONPATH = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """Keeps every span exported to it."""

    def __init__(self) -> None:
        self.spans: list = []

    def Export(self, request, context):
        for resource in request.resource_spans:
            for scope in resource.scope_spans:
                self.spans.extend(scope.spans)
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.fixture
def collector() -> Iterator[tuple[Collector, int]]:
    servicer = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield servicer, port
    finally:
        server.stop(None)


def post(url: str, headers: dict[str, str]) -> int:
    request = urllib.request.Request(url, data=b"traced body", headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_spans_continue_the_clients_trace(tmp_path: Path, collector) -> None:
    servicer, port = collector
    config = tmp_path / "host.toml"
    config.write_text(
        f"""
[server]
plugin_modules = ["tests.e2e.failing_plugins"]
[server.tracing]
enabled = true
endpoint = "http://127.0.0.1:{port}"
service_name = "extproc-host-test"
[routes.default]
chain = ["reject_413", "fail_on_chunk", "passthrough"]
body_mode = "FULL_DUPLEX_STREAMED"
[routes.plain]
chain = ["passthrough"]
path_prefix = "/plain"
body_mode = "FULL_DUPLEX_STREAMED"
"""
    )
    env = {"PYTHONPATH": PYTHONPATH, "OTEL_BSP_SCHEDULE_DELAY": "100"}
    trace_id, client_span = secrets.token_hex(16), secrets.token_hex(8)
    with Stack(None, config, host_env=env) as stack:
        ok = post(f"{stack.url}/ok", {"traceparent": f"00-{trace_id}-{client_span}-01"})
        rejected = post(f"{stack.url}/rejected", {"traceparent": f"00-{trace_id}-{client_span}-01", "x-reject": "yes"})
        failed = post(f"{stack.url}/failed", {"traceparent": f"00-{trace_id}-{client_span}-01", "x-fail-on-chunk": "1"})
        plain = post(f"{stack.url}/plain", {"traceparent": f"00-{trace_id}-{client_span}-01"})
        wait_until(
            lambda: len([s for s in servicer.spans if s.name.startswith("ext_proc ")]) >= 4, 15, "four stream spans"
        )
    assert (ok, rejected, failed, plain) == (200, 413, 500, 200)
    # A chain with no hook to run (passthrough alone) still gives its stream a span, with no children.
    (quiet,) = [s for s in servicer.spans if s.name == "ext_proc plain"]
    assert quiet.trace_id.hex() == trace_id and quiet.parent_span_id.hex() == client_span
    assert not [s for s in servicer.spans if s.parent_span_id == quiet.span_id]
    streams = [s for s in servicer.spans if s.name == "ext_proc default"]
    assert len(streams) == 3, [s.name for s in servicer.spans]
    for span in streams:
        assert span.trace_id.hex() == trace_id and span.parent_span_id.hex() == client_span
        assert span.kind == span.SPAN_KIND_SERVER
    hooks = [s for s in servicer.spans if not s.name.startswith("ext_proc ")]
    by_parent = {span.span_id: [h.name for h in hooks if h.parent_span_id == span.span_id] for span in streams}
    names = sorted(by_parent.values(), key=len)
    assert any("reject_413.on_request_headers" in n and "fail_on_chunk.on_request_body" in n for n in names)
    assert all(h.trace_id.hex() == trace_id for h in hooks)
    events = {e.name for span in streams for e in span.events}
    assert {"rejected", "plugin failed"} <= events
    failing = next(s for s in streams if any(e.name == "plugin failed" for e in s.events))
    assert failing.status.code == failing.status.STATUS_CODE_ERROR
    assert any(h.name == "fail_on_chunk.on_request_body" and h.status.code == h.status.STATUS_CODE_ERROR for h in hooks)
