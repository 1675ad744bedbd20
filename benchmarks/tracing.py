"""The cost of OpenTelemetry traces: the host with ``[server.tracing]`` on (every stream sampled)
against the same host with it off, side by side in one ``benchmarks/run.py`` run.

    make bench-tracing                      # or: .venv/bin/python benchmarks/tracing.py
    make bench-tracing ARGS="--runs 5"      # any run.py option passes through
    EXTPROC_SERVER__TRACING__SAMPLE_RATIO=0.1 make bench-tracing   # a share of the streams sampled

The traced host exports to an OTLP/gRPC sink served here, on a free loopback port, that counts
and drops what it receives, as a collector would take it (so the export's cost is in the
figures; its own CPU is not, it is the collector's). The spans received are printed at the end.
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

HERE = Path(__file__).resolve().parent


class Sink(trace_service_pb2_grpc.TraceServiceServicer):
    """Counts the spans exported to it."""

    def __init__(self) -> None:
        self.spans = 0

    def Export(self, request, context):
        self.spans += sum(len(scope.spans) for resource in request.resource_spans for scope in resource.scope_spans)
        return trace_service_pb2.ExportTraceServiceResponse()


def main() -> int:
    sink = Sink()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(sink, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    env = {**os.environ, "EXTPROC_SERVER__TRACING__ENDPOINT": f"http://127.0.0.1:{port}"}
    command = [
        sys.executable,
        str(HERE / "run.py"),
        "--setups",
        "host",
        "--plugin",
        f"traced={HERE / 'tracing.toml'}",
        *sys.argv[1:],
    ]
    try:
        code = subprocess.run(command, env=env, check=False).returncode
    finally:
        server.stop(None)
    print(f"spans the sink received: {sink.spans}")
    if code == 0 and sink.spans == 0:
        print("no span reached the sink: the traced figures are not those of exporting traces", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
