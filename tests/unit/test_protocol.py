"""Whole ext_proc conversations replayed against the host through the in-process fake Envoy."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from extproc_host.processor import Router
from extproc_host.registry import build_routes, discover, make_plugin_manager
from extproc_host.server import ExternalProcessor
from extproc_host.settings import load_settings

from . import sample_plugins
from .fake_envoy import (
    BUFFERED,
    NONE,
    STREAMED,
    fake_envoy,
    request_body,
    request_headers,
    request_trailers,
    response_body,
    response_headers,
    response_trailers,
)

ROUTES = """
[routes.default]
chain = ["passthrough"]

[routes.upper]
chain = ["upper"]

[routes.async-upper]
chain = ["async_upper"]

[routes.hold-upper]
chain = ["hold", "upper"]

[routes.upper-split]
chain = ["upper", "split"]

[routes.upper-split.plugins.split]
marker = "#"

[routes.headers]
chain = ["headers"]

[routes.prefixed]
chain = ["upper"]
path_prefix = "/shout"

[routes.fail-closed]
chain = ["record", "fail"]
failure_policy = "fail_closed"

[routes.fail-closed.plugins.fail]
after_chunks = 1

[routes.fail-open]
chain = ["record", "fail"]
failure_policy = "fail_open"

[routes.fail-open-late]
chain = ["upper", "fail"]
failure_policy = "fail_open"

[routes.fail-open-late.plugins.fail]
after_chunks = 1

[routes.reject]
chain = ["reject", "record"]

[routes.record]
chain = ["record", "passthrough"]

[routes.not-bytes]
chain = ["not_bytes"]

[routes.burst]
chain = ["burst"]

[routes.echo-header]
chain = ["echo_header"]

[routes.pieces-upper]
chain = ["pieces", "upper"]
"""


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "settings.toml"
    path.write_text(ROUTES)
    return str(path)


@pytest.fixture
async def envoy(config):
    async with fake_envoy(config, sample_plugins) as fake:
        yield fake


def body_of(response, kind):
    return getattr(response, kind).response.body_mutation


async def test_full_duplex_passthrough_echoes_every_chunk_in_order(envoy):
    chunks = [b"a" * 10, b"", b"b" * 1024 * 1024, b"c"]
    conv = await envoy.converse(
        [request_headers(route="default")]
        + [request_body(c) for c in chunks]
        + [request_body(b"", end=True), response_headers()]
        + [response_body(c) for c in chunks]
        + [response_body(b"", end=True)]
    )
    assert conv.code == grpc.StatusCode.OK
    kinds = [r.WhichOneof("response") for r in conv.responses]
    assert kinds[0] == "request_headers"
    body, flags = conv.streamed("request_body")
    assert body == b"".join(chunks)
    assert flags.count(True) == 1 and flags[-1] is True
    body, flags = conv.streamed("response_body")
    assert body == b"".join(chunks)
    assert flags.count(True) == 1 and flags[-1] is True
    # Headers answered before the request body, response headers before the response body.
    assert kinds.index("request_headers") < kinds.index("request_body")
    assert kinds.index("response_headers") < kinds.index("response_body")


async def test_full_duplex_transform_and_m_to_n(envoy):
    conv = await envoy.converse(
        [request_headers(route="hold-upper"), request_body(b"ab"), request_body(b"cd"), request_body(b"e", end=True)]
    )
    body, flags = conv.streamed("request_body")
    # hold swallows every chunk (no answer at all), then flushes once, through upper.
    assert body == b"<ABCDE>"
    assert flags == [True]


async def test_flush_of_one_plugin_feeds_the_next(envoy):
    conv = await envoy.converse(
        [request_headers(route="upper-split"), request_body(b"ab"), request_body(b"cd", end=True)]
    )
    body, flags = conv.streamed("request_body")
    assert body == b"AB#CD#"
    assert flags[-1] is True and flags.count(True) == 1


async def test_async_hooks(envoy):
    conv = await envoy.converse([request_headers(route="async-upper"), request_body(b"xy", end=True)])
    assert conv.streamed("request_body")[0] == b"XY"


async def test_route_by_path_prefix_when_no_attribute(envoy):
    conv = await envoy.converse([request_headers(path="/shout/it"), request_body(b"hi", end=True)])
    assert conv.streamed("request_body")[0] == b"HI"
    conv = await envoy.converse([request_headers(path="/quiet"), request_body(b"hi", end=True)])
    assert conv.streamed("request_body")[0] == b"hi"


async def test_unknown_route_name_falls_back_to_default(envoy):
    conv = await envoy.converse([request_headers(route="no-such-route"), request_body(b"hi", end=True)])
    assert conv.code == grpc.StatusCode.OK
    assert conv.streamed("request_body")[0] == b"hi"


async def test_streamed_answers_every_chunk_exactly_once(envoy):
    chunks = [b"one", b"", b"two", b"three"]
    msgs = [request_headers(route="upper", request_mode=STREAMED, response_mode=STREAMED)]
    msgs += [request_body(c, end=i == len(chunks) - 1) for i, c in enumerate(chunks)]
    conv = await envoy.converse(msgs)
    bodies = conv.of("request_body")
    assert len(bodies) == len(chunks)
    got = [body_of(r, "request_body") for r in bodies]
    assert got[0].body == b"ONE"
    assert got[1].WhichOneof("mutation") is None  # empty chunk: nothing to change
    assert [m.body for m in got[2:]] == [b"TWO", b"THREE"]


async def test_streamed_passthrough_sends_no_mutation(envoy):
    msgs = [request_headers(route="default", request_mode=STREAMED, response_mode=STREAMED)]
    msgs += [request_body(b"x" * 100), request_body(b"y", end=True)]
    conv = await envoy.converse(msgs)
    assert [body_of(r, "request_body").WhichOneof("mutation") for r in conv.of("request_body")] == [None, None]


async def test_streamed_swallowed_chunks_are_cleared_and_flush_goes_with_the_last(envoy):
    msgs = [request_headers(route="hold-upper", request_mode=STREAMED, response_mode=STREAMED)]
    msgs += [request_body(b"ab"), request_body(b"cd", end=True)]
    conv = await envoy.converse(msgs)
    muts = [body_of(r, "request_body") for r in conv.of("request_body")]
    assert muts[0].clear_body is True
    assert muts[1].body == b"<ABCD>"


async def test_buffered_replaces_body_and_fixes_content_length(envoy):
    msgs = [
        request_headers(
            route="upper-split", request_mode=BUFFERED, response_mode=BUFFERED, extra={"content-length": "4"}
        ),
        request_body(b"abcd", end=True),
    ]
    conv = await envoy.converse(msgs)
    (resp,) = conv.of("request_body")
    common = resp.request_body.response
    assert common.body_mutation.body == b"ABCD#"
    (cl,) = [h for h in common.header_mutation.set_headers if h.header.key == "content-length"]
    assert cl.header.raw_value == b"5"


async def test_buffered_same_size_keeps_content_length(envoy):
    msgs = [
        request_headers(route="upper", request_mode=BUFFERED, response_mode=BUFFERED),
        request_body(b"abcd", end=True),
    ]
    conv = await envoy.converse(msgs)
    (resp,) = conv.of("request_body")
    assert resp.request_body.response.body_mutation.body == b"ABCD"
    assert not resp.request_body.response.header_mutation.set_headers


async def test_headers_only_mode(envoy):
    conv = await envoy.converse(
        [
            request_headers(
                route="headers", request_mode=NONE, response_mode=NONE, end_of_stream=True, extra={"x-secret": "s"}
            ),
            response_headers(end_of_stream=True),
        ]
    )
    req, resp = conv.responses
    mutation = req.request_headers.response.header_mutation
    assert list(mutation.remove_headers) == ["x-secret"]
    assert [(h.header.key, h.header.raw_value) for h in mutation.set_headers] == [("x-route", b"headers")]
    added = resp.response_headers.response.header_mutation.set_headers
    assert [(h.header.key, h.header.raw_value, h.append_action) for h in added] == [("x-added", b"1", 0)]


async def test_empty_body_full_duplex(envoy):
    conv = await envoy.converse([request_headers(route="upper"), request_body(b"", end=True)])
    body, flags = conv.streamed("request_body")
    assert body == b"" and flags == [True]


async def test_full_duplex_trailers_end_the_body_and_are_answered(envoy):
    conv = await envoy.converse(
        [
            request_headers(route="headers"),
            request_body(b"data"),
            request_trailers({"x-checksum": "abc"}),
            response_headers(),
            response_body(b"resp"),
            response_trailers({"x-internal": "1", "x-other": "2"}),
        ]
    )
    kinds = [r.WhichOneof("response") for r in conv.responses]
    assert kinds == [
        "request_headers",
        "request_body",
        "request_trailers",
        "response_headers",
        "response_body",
        "response_trailers",
    ]
    (rt,) = conv.of("request_trailers")
    assert [(h.header.key, h.header.raw_value) for h in rt.request_trailers.header_mutation.set_headers] == [
        ("x-trailer-seen", b"abc")
    ]
    (st,) = conv.of("response_trailers")
    assert list(st.response_trailers.header_mutation.remove_headers) == ["x-internal"]


async def test_full_duplex_trailers_flush_held_bytes_before_the_trailer_answer(envoy):
    conv = await envoy.converse(
        [request_headers(route="hold-upper"), request_body(b"ab"), request_trailers({"t": "1"})]
    )
    kinds = [r.WhichOneof("response") for r in conv.responses]
    assert kinds == ["request_headers", "request_body", "request_trailers"]
    assert conv.streamed("request_body")[0] == b"<AB>"


async def test_streamed_trailers_with_held_bytes_fail_the_stream(envoy):
    conv = await envoy.converse(
        [request_headers(route="hold-upper", request_mode=STREAMED), request_body(b"ab"), request_trailers({"t": "1"})]
    )
    assert conv.code == grpc.StatusCode.INTERNAL
    assert "FULL_DUPLEX_STREAMED" in conv.details


async def test_fail_closed_aborts_the_stream_and_closes_plugins_once(envoy):
    sample_plugins.EVENTS.clear()
    conv = await envoy.converse(
        [request_headers(route="fail-closed"), request_body(b"1"), request_body(b"2"), request_body(b"3", end=True)]
    )
    assert conv.code == grpc.StatusCode.INTERNAL
    assert "plugin 'fail' failed in on_request_body" in conv.details
    closes = [e for e in sample_plugins.EVENTS if e[1] == "close"]
    assert len(closes) == 1 and closes[0][2] == "PluginError"
    # The body never ended, so record never saw its end.
    assert not [e for e in sample_plugins.EVENTS if e[1] == "request_body_end"]


async def test_a_stream_failed_while_envoy_still_sends_reports_the_hosts_status_every_time(envoy):
    # The host ends the stream at the first body message while 2.5 MiB more are on their way: a
    # client must see the host's status, not a failed write (Envoy does; grpc.aio may not).
    chunk = b"x" * 65536
    for _ in range(12):
        conv = await envoy.converse(
            [
                request_headers(route="fail-closed"),
                *[request_body(chunk) for _ in range(40)],
                request_body(b"", end=True),
            ]
        )
        assert conv.code == grpc.StatusCode.INTERNAL
        assert "plugin 'fail' failed in on_request_body" in conv.details


async def test_fail_open_before_anything_changed_passes_the_rest_untouched(envoy):
    sample_plugins.EVENTS.clear()
    conv = await envoy.converse(
        [
            request_headers(route="fail-open"),
            request_body(b"1"),
            request_body(b"2", end=True),
            response_headers(),
            response_body(b"r", end=True),
        ]
    )
    assert conv.code == grpc.StatusCode.OK
    assert conv.streamed("request_body") == (b"12", [False, True])
    assert conv.streamed("response_body") == (b"r", [True])
    closes = [e for e in sample_plugins.EVENTS if e[1] == "close"]
    assert len(closes) == 1 and closes[0][2] == "PluginError"


async def test_fail_open_after_a_change_reached_envoy_fails_closed(envoy):
    conv = await envoy.converse(
        [request_headers(route="fail-open-late"), request_body(b"a"), request_body(b"b"), request_body(b"c", end=True)]
    )
    assert conv.code == grpc.StatusCode.INTERNAL
    assert conv.streamed("request_body")[0] == b"A"


async def test_reject_sends_an_immediate_response(envoy):
    sample_plugins.EVENTS.clear()
    conv = await envoy.converse(
        [request_headers(route="reject", extra={"x-reject": "1"}), request_body(b"x", end=True)]
    )
    assert conv.code == grpc.StatusCode.OK
    (imm,) = conv.of("immediate_response")
    assert imm.immediate_response.status.code == 413
    assert imm.immediate_response.body == b"too large"
    assert [(h.header.key, h.header.raw_value) for h in imm.immediate_response.headers.set_headers] == [
        ("x-why", b"test")
    ]
    assert [e[1:] for e in sample_plugins.EVENTS if e[1] == "close"] == [("close", "Reject")]


async def test_reset_mid_body_closes_plugins_with_an_error(envoy):
    sample_plugins.EVENTS.clear()
    # Envoy half-closes after two chunks of a body that never ended.
    conv = await envoy.converse([request_headers(route="record"), request_body(b"1"), request_body(b"2")])
    assert conv.code == grpc.StatusCode.OK
    assert [e[1:] for e in sample_plugins.EVENTS] == [
        ("request_body", 1),
        ("request_body", 1),
        ("close", "StreamAborted"),
    ]


async def test_complete_exchange_closes_plugins_without_error(envoy):
    sample_plugins.EVENTS.clear()
    await envoy.converse(
        [
            request_headers(route="record"),
            request_body(b"1", end=True),
            response_headers(),
            response_body(b"", end=True),
        ]
    )
    assert [e[1:] for e in sample_plugins.EVENTS] == [
        ("request_body", 1),
        ("request_body_end",),
        ("response_body_end",),
        ("close", None),
    ]


async def test_plugin_returning_none_is_reported_by_name(envoy):
    conv = await envoy.converse([request_headers(route="not-bytes"), request_body(b"1", end=True)])
    assert conv.code == grpc.StatusCode.INTERNAL
    assert "not_bytes" in conv.details and "expected bytes" in conv.details


async def test_host_keeps_serving_after_failures(envoy):
    await envoy.converse([request_headers(route="fail-closed"), request_body(b"1"), request_body(b"2")])
    conv = await envoy.converse([request_headers(route="upper"), request_body(b"ok", end=True)])
    assert conv.code == grpc.StatusCode.OK and conv.streamed("request_body")[0] == b"OK"


async def test_large_flush_goes_back_in_envoy_sized_chunks(envoy):
    conv = await envoy.converse([request_headers(route="burst"), request_body(b"a"), request_body(b"b", end=True)])
    pieces = [r.request_body.response.body_mutation.streamed_response for r in conv.of("request_body")]
    assert [len(p.body) for p in pieces] == [1, 1024 * 1024, 1024 * 1024, 1024 * 1024, 2]
    assert [p.end_of_stream for p in pieces] == [False, False, False, False, True]
    assert b"".join(p.body for p in pieces) == b"a" + b"b" + b"z" * (3 * 1024 * 1024 + 1)


async def wait_for_close(count: int = 1) -> list[tuple]:
    for _ in range(200):
        closes = [e for e in sample_plugins.EVENTS if e[1] == "close"]
        if len(closes) >= count:
            return closes
        await asyncio.sleep(0.01)
    raise AssertionError(f"no close after cancel: {sample_plugins.EVENTS}")


async def cancel_after_responses(config, messages, count):
    """Run the servicer's Process as grpc.aio does, then cancel its task (Envoy's reset)
    once ``count`` responses are out and the request stream is still open."""
    settings = load_settings(config)
    pm = make_plugin_manager()
    pm.register(sample_plugins)
    servicer = ExternalProcessor(Router(build_routes(settings, discover(pm), config)), pm)

    async def requests():
        for message in messages:
            yield message
        await asyncio.Event().wait()

    got = []

    async def drive():
        async for response in servicer.Process(requests(), context=None):
            got.append(response)

    task = asyncio.create_task(drive())
    for _ in range(200):
        if len(got) >= count:
            break
        await asyncio.sleep(0.005)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    return got


async def test_envoy_cancelling_a_finished_exchange_is_not_an_error(config):
    sample_plugins.EVENTS.clear()
    msgs = [
        request_headers(route="record"),
        request_body(b"1", end=True),
        response_headers(),
        response_body(b"2", end=True),
    ]
    assert len(await cancel_after_responses(config, msgs, 4)) == 4
    assert [e[1:] for e in sample_plugins.EVENTS if e[1] == "close"] == [("close", None)]


async def test_envoy_cancelling_mid_body_is_an_abort(config):
    sample_plugins.EVENTS.clear()
    msgs = [request_headers(route="record"), request_body(b"1"), request_body(b"2")]
    assert len(await cancel_after_responses(config, msgs, 3)) == 3
    assert [e[1:] for e in sample_plugins.EVENTS if e[1] == "close"] == [("close", "StreamAborted")]


async def test_request_headers_are_in_stream_info_without_a_header_hook(envoy):
    conv = await envoy.converse(
        [
            request_headers(route="echo-header", extra={"x-tag": "T"}),
            request_body(b"", end=True),
            response_headers(),
            response_body(b"body", end=True),
        ]
    )
    assert conv.streamed("response_body")[0] == b"Tbody"


async def test_iterator_answers_stream_through_the_rest_of_the_chain(envoy):
    conv = await envoy.converse(
        [request_headers(route="pieces-upper"), request_body(b"abcd"), request_body(b"ef", end=True)]
    )
    pieces = [r.request_body.response.body_mutation.streamed_response for r in conv.of("request_body")]
    body = b"".join(p.body for p in pieces)
    assert body == b"ABCDEFXY" + b"Z" * (2 * 1024 * 1024)
    assert [p.end_of_stream for p in pieces].count(True) == 1 and pieces[-1].end_of_stream
    assert max(len(p.body) for p in pieces) <= 1024 * 1024


async def test_iterator_answers_are_joined_in_streamed_mode(envoy):
    conv = await envoy.converse(
        [
            request_headers(route="pieces-upper", request_mode=STREAMED),
            request_body(b"ab"),
            request_body(b"c", end=True),
        ]
    )
    first, last = [r.request_body.response.body_mutation for r in conv.of("request_body")]
    assert first.body == b"AB"
    assert last.body == b"CXY" + b"Z" * (2 * 1024 * 1024)


async def test_iterator_failing_midway_fails_the_stream(envoy):
    conv = await envoy.converse(
        [request_headers(route="pieces-upper", extra={"x-break": "1"}), request_body(b"ab", end=True)]
    )
    assert conv.code == grpc.StatusCode.INTERNAL
    assert "plugin 'pieces' failed in on_request_body_end" in conv.details
    # What went out before the failure is never followed by an end of stream.
    assert True not in conv.streamed("request_body")[1]
