"""An in-process fake of Envoy's side of ext_proc: replays whole conversations against the host.

Unit tests only; the end-to-end tests use a real Envoy.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from google.protobuf import struct_pb2

from extproc_host.admission import Limits
from extproc_host.listeners import Listener, parse_address
from extproc_host.metrics import Metrics
from extproc_host.processor import Router
from extproc_host.registry import build_routes, discover, make_plugin_manager
from extproc_host.server import ExternalProcessor, make_server
from extproc_host.settings import Settings, load_settings

Mode = processing_mode_pb2.ProcessingMode.BodySendMode
FD, STREAMED, BUFFERED, NONE = Mode.FULL_DUPLEX_STREAMED, Mode.STREAMED, Mode.BUFFERED, Mode.NONE


def header_map(headers: dict[str, str] | Iterable[tuple[str, str]]) -> base_pb2.HeaderMap:
    items = headers.items() if isinstance(headers, dict) else headers
    return base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in items])


def request_headers(
    path: str = "/",
    route: str | None = None,
    request_mode: int = FD,
    response_mode: int = FD,
    end_of_stream: bool = False,
    extra: dict[str, str] | None = None,
) -> pb.ProcessingRequest:
    """The first message of a stream, as Envoy sends it (route attribute, protocol config)."""
    headers = {":method": "POST", ":path": path, ":authority": "test", **(extra or {})}
    req = pb.ProcessingRequest(
        request_headers=pb.HttpHeaders(headers=header_map(headers), end_of_stream=end_of_stream),
        protocol_config=pb.ProtocolConfiguration(request_body_mode=request_mode, response_body_mode=response_mode),
    )
    if route is not None:
        attrs = struct_pb2.Struct()
        attrs.update({"xds.route_name": route})
        req.attributes["envoy.filters.http.ext_proc"].CopyFrom(attrs)
    return req


def response_headers(end_of_stream: bool = False, extra: dict[str, str] | None = None) -> pb.ProcessingRequest:
    headers = {":status": "200", **(extra or {})}
    return pb.ProcessingRequest(
        response_headers=pb.HttpHeaders(headers=header_map(headers), end_of_stream=end_of_stream)
    )


def request_body(data: bytes, end: bool = False) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(request_body=pb.HttpBody(body=data, end_of_stream=end))


def response_body(data: bytes, end: bool = False) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(response_body=pb.HttpBody(body=data, end_of_stream=end))


def request_trailers(trailers: dict[str, str]) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(request_trailers=pb.HttpTrailers(trailers=header_map(trailers)))


def response_trailers(trailers: dict[str, str]) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(response_trailers=pb.HttpTrailers(trailers=header_map(trailers)))


@dataclass
class Conversation:
    """What the host answered to one replayed stream."""

    responses: list[pb.ProcessingResponse]
    code: grpc.StatusCode
    details: str | None

    def of(self, kind: str) -> list[pb.ProcessingResponse]:
        return [r for r in self.responses if r.WhichOneof("response") == kind]

    def streamed(self, kind: str) -> tuple[bytes, list[bool]]:
        """Joined full-duplex body of ``kind`` and the end_of_stream flags seen."""
        parts = [
            r for r in self.of(kind) if r.__getattribute__(kind).response.body_mutation.HasField("streamed_response")
        ]
        flags = [getattr(r, kind).response.body_mutation.streamed_response.end_of_stream for r in parts]
        return b"".join(getattr(r, kind).response.body_mutation.streamed_response.body for r in parts), flags


class FakeEnvoy:
    """A host served in-process on an ephemeral port, and a client that replays conversations.

    ``stub`` is a grpc.aio stub for tests that drive a stream step by step; :meth:`converse`
    uses grpc's blocking client in a thread instead. grpc.aio's client may report a stream the
    server ended before the client half-closed as ``INTERNAL: Internal error from Core`` in
    place of the server's status (grpc/grpc#36066); the blocking client reports the status the
    server sent, as Envoy does.
    """

    def __init__(self, port: int, servicer: ExternalProcessor) -> None:
        self.port = port
        self.servicer = servicer
        options = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options)
        self._blocking_channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=options)
        self.stub = pb_grpc.ExternalProcessorStub(self.channel)
        self.blocking_stub = pb_grpc.ExternalProcessorStub(self._blocking_channel)

    async def close(self) -> None:
        """Close both clients' channels."""
        self._blocking_channel.close()
        await self.channel.close()

    async def converse(
        self, messages: Iterable[pb.ProcessingRequest], cancel_after: int | None = None, settle: bool = True
    ) -> Conversation:
        """Send every message, half-close, collect every response and the final status.

        With ``cancel_after=N`` the call is cancelled after N responses (Envoy resetting the stream).
        With ``settle`` (the default) it returns once the host has closed every stream's plugins;
        conversations run concurrently pass ``settle=False``.
        """
        conversation = await asyncio.to_thread(self._converse, list(messages), cancel_after)
        # Like Envoy, the client may see the status before the host has closed the stream's
        # plugins: wait for that, so tests can look at what close did.
        if settle:
            await self.servicer.drain(timeout=10)
        return conversation

    def _converse(self, messages: list[pb.ProcessingRequest], cancel_after: int | None) -> Conversation:
        call = self.blocking_stub.Process(iter(messages))
        responses: list[pb.ProcessingResponse] = []
        try:
            for response in call:
                responses.append(response)
                if cancel_after is not None and len(responses) >= cancel_after:
                    call.cancel()
                    return Conversation(responses, grpc.StatusCode.CANCELLED, None)
        except grpc.RpcError as exc:
            return Conversation(responses, exc.code(), exc.details())
        return Conversation(responses, call.code(), call.details())


@contextlib.asynccontextmanager
async def fake_envoy(
    config_path: str,
    *extra_plugin_modules: object,
    servicer_class: type[ExternalProcessor] = ExternalProcessor,
    metrics: Metrics | None = None,
) -> AsyncIterator[FakeEnvoy]:
    """Serve the host's ExternalProcessor for ``config_path`` in this event loop.

    ``extra_plugin_modules`` are registered with the plugin manager next to the installed ones;
    ``servicer_class`` may be a subclass of ExternalProcessor that observes the streams.
    """
    settings = load_settings(config_path)
    pm = make_plugin_manager()
    for module in extra_plugin_modules:
        pm.register(module)
    routes = build_routes(settings, discover(pm), config_path)
    limits = Limits.from_settings(settings.server)
    servicer = servicer_class(Router(routes, metrics, settings.server.max_message_bytes), pm, limits=limits)
    async with serve(settings, servicer) as envoy:
        yield envoy


@contextlib.asynccontextmanager
async def serve(settings: Settings, servicer: ExternalProcessor) -> AsyncIterator[FakeEnvoy]:
    """``servicer`` on the server ``settings`` make (the shipped transport;
    EXTPROC_SERVER__TRANSPORT=grpcio: grpc.aio) on a free port, and a client playing Envoy;
    everything stopped at the end."""
    server = make_server(settings, servicer)
    port = int((await Listener(parse_address("127.0.0.1:0")).start(server)).rpartition(":")[2])
    envoy = FakeEnvoy(port, servicer)
    try:
        yield envoy
    finally:
        await envoy.close()
        await server.stop(None)
        await servicer.drain()
        servicer.upkeep.stop()
