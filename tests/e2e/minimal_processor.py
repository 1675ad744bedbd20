"""A minimal ext_proc passthrough server, independent of extproc-host.

It answers every message so that bodies pass unchanged, in every body mode, and adds two
response headers that show what Envoy told it: ``x-processor-route`` (the xds.route_name
attribute) and ``x-processor-modes`` (request and response body modes from the first
message's protocol_config). The end-to-end tests use it to check the Envoy configs on their
own, and benchmarks can run it as a baseline host:

    python tests/e2e/minimal_processor.py --listen 127.0.0.1:0
    -> prints "minimal-processor listening on 127.0.0.1:PORT"
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

# Set to print, per stream, the number and sizes of the body chunks Envoy sent.
LOG_CHUNKS = bool(os.environ.get("MINIMAL_PROCESSOR_LOG_CHUNKS"))
FD = processing_mode_pb2.ProcessingMode.FULL_DUPLEX_STREAMED
_mode_name = processing_mode_pb2.ProcessingMode.BodySendMode.Name


def _header(key: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=key, raw_value=value.encode()))


class Processor(pb_grpc.ExternalProcessorServicer):
    async def Process(self, request_iterator, context):
        route = ""
        modes = (0, 0)
        sizes: dict[str, list[int]] = {"request_body": [], "response_body": []}
        async for req in request_iterator:
            kind = req.WhichOneof("request")
            if req.HasField("protocol_config"):
                cfg = req.protocol_config
                modes = (cfg.request_body_mode, cfg.response_body_mode)
            if "envoy.filters.http.ext_proc" in req.attributes:
                fields = req.attributes["envoy.filters.http.ext_proc"].fields
                if "xds.route_name" in fields:
                    route = fields["xds.route_name"].string_value
            if kind == "request_headers":
                yield pb.ProcessingResponse(request_headers=pb.HeadersResponse())
            elif kind == "response_headers":
                mutation = pb.HeaderMutation(
                    set_headers=[
                        _header("x-processor-route", route),
                        _header("x-processor-modes", f"{_mode_name(modes[0])},{_mode_name(modes[1])}"),
                    ]
                )
                yield pb.ProcessingResponse(
                    response_headers=pb.HeadersResponse(response=pb.CommonResponse(header_mutation=mutation))
                )
            elif kind in ("request_body", "response_body"):
                body = getattr(req, kind)
                sizes[kind].append(len(body.body))
                fd = modes[0 if kind == "request_body" else 1] == FD
                if fd:
                    common = pb.CommonResponse(
                        body_mutation=pb.BodyMutation(
                            streamed_response=pb.StreamedBodyResponse(body=body.body, end_of_stream=body.end_of_stream)
                        )
                    )
                    yield pb.ProcessingResponse(**{kind: pb.BodyResponse(response=common)})
                else:
                    yield pb.ProcessingResponse(**{kind: pb.BodyResponse()})
            elif kind in ("request_trailers", "response_trailers"):
                yield pb.ProcessingResponse(**{kind: pb.TrailersResponse()})
        if LOG_CHUNKS:
            for kind, seen in sizes.items():
                if seen:
                    print(
                        f"{route} {kind}: {len(seen)} chunks, {sum(seen)} bytes, max {max(seen)},"
                        f" empty {seen.count(0)}",
                        file=sys.stderr,
                        flush=True,
                    )


async def main(listen: str) -> None:
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", 128 * 1024 * 1024),
            ("grpc.max_send_message_length", 128 * 1024 * 1024),
        ]
    )
    pb_grpc.add_ExternalProcessorServicer_to_server(Processor(), server)
    port = server.add_insecure_port(listen)
    await server.start()
    host = listen.rpartition(":")[0]
    print(f"minimal-processor listening on {host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", default="127.0.0.1:0")
    asyncio.run(main(parser.parse_args().listen))
