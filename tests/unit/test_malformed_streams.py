"""Malformed and out-of-order ext_proc streams, generated with hypothesis, against a real
grpc.aio server in-process.

Property, for any sequence of ProcessingRequests (random kinds, bodies, end_of_stream flags,
missing or unknown body modes, bodies before headers or after their end, trailers twice,
messages with no kind) and for frames of bytes that may not be protobuf at all:

- the stream completes, or ends with INVALID_ARGUMENT (a protocol violation) or, when a
  plugin of the chain refused what it was given, INTERNAL naming the plugin; never UNKNOWN
  (an unhandled exception in the host) or a bare INTERNAL;
- every plugin instance built for the stream is closed exactly once;
- a well-formed stream afterwards succeeds, byte for byte.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter

import grpc
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf import struct_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extproc_host import Plugin, hookimpl
from extproc_host.server import ExternalProcessor

from . import sample_plugins
from .fake_envoy import FD, fake_envoy, header_map, request_body, request_headers, response_body, response_headers

LIFECYCLE: list[tuple[str, str]] = []  # (event, stream id): "open" when built, "close" when closed


class Lifecycle(Plugin):
    """Records its construction and its close, so a test can count closes per stream."""

    name = "lifecycle"

    def __init__(self, settings, stream):
        super().__init__(settings, stream)
        LIFECYCLE.append(("open", stream.stream_id))

    def close(self, error) -> None:
        LIFECYCLE.append(("close", self.stream.stream_id))


@hookimpl
def register_plugins(register):
    register(Lifecycle)


ENDINGS: list[tuple[grpc.StatusCode | None, str | None, BaseException | None]] = []


class EndingRecorder(ExternalProcessor):
    """The host's servicer, recording how each Process call ended on the server side: the
    status it set, or the exception that escaped it (an unhandled one would be UNKNOWN).

    The client's view is not enough: when the host ends a stream while the client still
    writes, grpc's Python client reports its own failed write ("Internal error from Core").
    """

    async def Process(self, request_iterator, context):
        escaped: BaseException | None = None
        try:
            async for response in super().Process(request_iterator, context):
                yield response
        except BaseException as exc:
            escaped = exc
            raise
        finally:
            code = context.code()
            if code is not None:  # the builtin server's StatusCode has grpc.StatusCode's names
                code = grpc.StatusCode[code.name]
            ENDINGS.append((code, context.details(), escaped))


ROUTE_CHAINS = {
    "default": ["lifecycle", "passthrough"],
    "record": ["lifecycle", "record", "passthrough"],
    "hold-upper": ["lifecycle", "hold", "upper"],
    "upper-split": ["lifecycle", "upper", "split"],
    "headers": ["lifecycle", "headers"],
    "pieces-upper": ["lifecycle", "pieces", "upper"],
    "async-upper": ["lifecycle", "async_upper"],
}
ROUTES = "".join(f"[routes.{name}]\nchain = {chain!r}\n".replace("'", '"') for name, chain in ROUTE_CHAINS.items())

# Known body modes 0-4 and values no Envoy sends.
modes = st.sampled_from([0, 1, 2, 3, 4, 5, 99])
routes = st.sampled_from([*ROUTE_CHAINS, "no-such-route", ""])
bodies = st.binary(max_size=64)
header_values = st.text(max_size=12)


@st.composite
def headers_message(draw, kind: str) -> pb.ProcessingRequest:
    items = [(":path", draw(st.sampled_from(["/", "/x", ""]))), ("x-h", draw(header_values))]
    req = pb.ProcessingRequest(**{kind: pb.HttpHeaders(headers=header_map(items), end_of_stream=draw(st.booleans()))})
    if draw(st.booleans()):
        req.protocol_config.request_body_mode = draw(modes)
        req.protocol_config.response_body_mode = draw(modes)
    if kind == "request_headers" and draw(st.booleans()):
        attrs = struct_pb2.Struct()
        attrs.update({"xds.route_name": draw(routes)})
        req.attributes["envoy.filters.http.ext_proc"].CopyFrom(attrs)
    return req


@st.composite
def any_message(draw) -> pb.ProcessingRequest:
    kind = draw(
        st.sampled_from(
            [
                "request_headers",
                "response_headers",
                "request_body",
                "response_body",
                "request_trailers",
                "response_trailers",
                None,
            ]
        )
    )
    if kind is None:
        req = pb.ProcessingRequest()  # no kind at all
    elif kind.endswith("headers"):
        req = draw(headers_message(kind))
    elif kind.endswith("body"):
        req = pb.ProcessingRequest(**{kind: pb.HttpBody(body=draw(bodies), end_of_stream=draw(st.booleans()))})
    else:
        req = pb.ProcessingRequest(**{kind: pb.HttpTrailers(trailers=header_map({"x-t": draw(header_values)}))})
    if draw(st.integers(0, 9)) == 0:
        req.observability_mode = True
    return req


def well_formed_start(route: str, request_mode: int, response_mode: int) -> pb.ProcessingRequest:
    return request_headers(route=route, request_mode=request_mode, response_mode=response_mode)


# Half the conversations start the way Envoy does (so the order checks deep in a stream are
# reached), half are random from the first message on.
conversations = st.one_of(
    st.lists(any_message(), max_size=8),
    st.builds(
        lambda first, rest: [first, *rest],
        st.builds(
            well_formed_start,
            st.sampled_from(list(ROUTE_CHAINS)),
            st.sampled_from([0, 1, 2, 4]),
            st.sampled_from([0, 1, 2, 4]),
        ),
        st.lists(any_message(), max_size=10),
    ),
)

# A frame: a valid message's bytes, those bytes cut or flipped, or random bytes.
frames = st.one_of(
    any_message().map(lambda m: m.SerializeToString()),
    st.tuples(any_message(), st.integers(0, 40)).map(lambda t: t[0].SerializeToString()[: t[1]]),
    st.binary(min_size=1, max_size=40),
)


@pytest.fixture
def served(tmp_path):
    """A fake Envoy on its own event loop, kept for the whole test (hypothesis runs many
    examples in one test function); yields ``run(coroutine)`` and the FakeEnvoy."""
    config = tmp_path / "settings.toml"
    config.write_text(ROUTES)
    loop = asyncio.new_event_loop()
    this_module = __import__(__name__, fromlist=["register_plugins"])
    manager = fake_envoy(str(config), sample_plugins, this_module, servicer_class=EndingRecorder)
    envoy = loop.run_until_complete(manager.__aenter__())
    try:
        yield loop.run_until_complete, envoy
    finally:
        loop.run_until_complete(manager.__aexit__(None, None, None))
        loop.close()


async def settled() -> None:
    """Wait (bounded) until the host's Process call has ended: the client may see the status
    first."""
    for _ in range(1000):
        if ENDINGS:
            return
        await asyncio.sleep(0.005)


def assert_clean_end(code: grpc.StatusCode, details: str | None) -> None:
    """How the client saw the stream end, and how the host ended it, are both clean."""
    assert len(ENDINGS) == 1, ENDINGS
    server_code, server_details, escaped = ENDINGS[0]
    if escaped is not None:
        # Only an abort (the status set by the host) may leave the handler.
        assert server_code is not None, f"unhandled {escaped!r} escaped the host's Process"
    _assert_clean_status(server_code or grpc.StatusCode.OK, server_details)
    if (code, details) != (grpc.StatusCode.INTERNAL, "Internal error from Core"):  # see EndingRecorder
        _assert_clean_status(code, details)


def _assert_clean_status(code: grpc.StatusCode, details: str | None) -> None:
    if code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT):
        return
    # A chain may legitimately refuse a well-ordered stream (e.g. a flush after the last
    # STREAMED chunk): that is INTERNAL naming the plugin, never a host traceback.
    assert code == grpc.StatusCode.INTERNAL and (details or "").startswith("plugin '"), (code, details)


def assert_closed_exactly_once() -> None:
    events = Counter(LIFECYCLE)
    for (event, stream_id), count in events.items():
        assert count == 1, (event, stream_id, count)
        if event == "open":
            assert events[("close", stream_id)] == 1, f"stream {stream_id} built its plugins and never closed them"
        else:
            assert events[("open", stream_id)] == 1, f"stream {stream_id} closed plugins it never built"


async def assert_well_formed_stream_succeeds(envoy) -> None:
    body = b"after the storm" * 100
    conv = await envoy.converse(
        [
            request_headers(route="default", request_mode=FD, response_mode=FD),
            request_body(body, end=True),
            response_headers(),
            response_body(body, end=True),
        ]
    )
    assert conv.code == grpc.StatusCode.OK, conv.details
    assert conv.streamed("request_body")[0] == body
    assert conv.streamed("response_body")[0] == body


@settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(messages=conversations)
def test_any_message_sequence_ends_cleanly(served, messages):
    run, envoy = served
    LIFECYCLE.clear()
    ENDINGS.clear()
    sample_plugins.EVENTS.clear()
    conv = run(envoy.converse(messages))
    run(settled())
    assert_clean_end(conv.code, conv.details)
    assert_closed_exactly_once()
    run(assert_well_formed_stream_succeeds(envoy))
    assert_closed_exactly_once()


async def send_frames(envoy, frames: list[bytes]) -> tuple[grpc.StatusCode, str | None]:
    """Send raw bytes as gRPC messages (no serializer), half-close, return the final status."""
    process = envoy.channel.stream_stream("/envoy.service.ext_proc.v3.ExternalProcessor/Process")
    call = process(iter(frames))
    with contextlib.suppress(grpc.aio.AioRpcError):
        async for _ in call:
            pass
    code, details = await call.code(), await call.details()
    await envoy.servicer.drain(timeout=10)
    return code, details


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(frames=st.lists(frames, min_size=1, max_size=5))
def test_bytes_that_are_not_processing_requests_end_cleanly(served, frames):
    run, envoy = served
    LIFECYCLE.clear()
    ENDINGS.clear()
    code, details = run(send_frames(envoy, frames))
    run(settled())
    assert_clean_end(code, details)
    assert_closed_exactly_once()
    run(assert_well_formed_stream_succeeds(envoy))


@pytest.mark.parametrize(
    ("messages", "complaint"),
    [
        ([request_body(b"a", end=True), request_body(b"b")], "request body chunk after the request body ended"),
        ([request_headers(end_of_stream=True), request_body(b"a")], "request body chunk after the request body ended"),
        ([request_headers(), response_headers(), response_headers()], "response headers sent twice"),
        ([request_headers(), request_body(b"a"), request_headers()], "request headers sent twice"),
        ([request_body(b"a"), request_headers()], "request headers after the request body"),
        (
            [request_headers(), pb.ProcessingRequest(request_trailers=pb.HttpTrailers()), request_body(b"a")],
            "request body chunk after the request body ended (trailers)",
        ),
        ([request_headers(), response_body(b"a", end=True), response_body(b"")], "response body chunk after"),
        ([request_headers(), pb.ProcessingRequest()], "carries no known message"),
        ([request_headers(request_mode=99)], "unknown request body mode 99"),
    ],
)
def test_protocol_violations_are_invalid_argument(served, messages, complaint):
    run, envoy = served
    LIFECYCLE.clear()
    conv = run(envoy.converse(messages))
    assert conv.code == grpc.StatusCode.INVALID_ARGUMENT, (conv.code, conv.details)
    assert complaint in conv.details
    assert_closed_exactly_once()


def test_trailers_twice_are_invalid_argument(served):
    run, envoy = served
    trailers = pb.ProcessingRequest(response_trailers=pb.HttpTrailers())
    conv = run(envoy.converse([request_headers(), response_headers(), trailers, trailers]))
    assert conv.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "response trailers sent twice" in conv.details


def test_garbage_bytes_are_invalid_argument(served):
    run, envoy = served
    code, details = run(send_frames(envoy, [request_headers().SerializeToString(), b"\xff\xff\xff\x07junk"]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "undecodable ProcessingRequest" in details
