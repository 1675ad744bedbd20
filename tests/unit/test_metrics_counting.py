"""What the metrics count, through the in-process fake Envoy: body bytes in and out in every
answer form (unchanged, replaced, held back and flushed, streamed as pieces), outcomes, hook
calls and plugin errors."""

from __future__ import annotations

import pytest

from extproc_host.metrics import Metrics

from . import sample_plugins
from .fake_envoy import BUFFERED, STREAMED, fake_envoy, request_body, request_headers, response_body, response_headers

ROUTES = """
[routes.default]
chain = ["passthrough"]

[routes.hold-upper]
chain = ["hold", "upper"]

[routes.pieces-upper]
chain = ["pieces", "upper"]

[routes.fail]
chain = ["fail"]

[routes.fail.plugins.fail]
after_chunks = 1
"""


@pytest.fixture
async def envoy(tmp_path):
    path = tmp_path / "settings.toml"
    path.write_text(ROUTES)
    metrics = Metrics()
    async with fake_envoy(str(path), sample_plugins, metrics=metrics) as fake:
        yield fake, metrics


def value(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def body_bytes(metrics: Metrics, route: str) -> dict[str, float]:
    return {
        f"{d}_{w}": value(metrics, "extproc_body_bytes_total", route=route, direction=d, way=w)
        for d in ("request", "response")
        for w in ("in", "out")
    }


async def test_passthrough_counts_bytes_in_and_out_alike(envoy):
    fake, metrics = envoy
    await fake.converse(
        [
            request_headers(route="default"),
            request_body(b"a" * 1000),
            request_body(b"b" * 24, end=True),
            response_headers(),
            response_body(b"r" * 77, end=True),
        ]
    )
    assert body_bytes(metrics, "default") == {
        "request_in": 1024,
        "request_out": 1024,
        "response_in": 77,
        "response_out": 77,
    }
    assert value(metrics, "extproc_streams_total", route="default", outcome="ok") == 1


@pytest.mark.parametrize("mode", [None, STREAMED, BUFFERED], ids=["full-duplex", "streamed", "buffered"])
async def test_held_back_and_flushed_bytes_count_as_out(envoy, mode):
    fake, metrics = envoy
    modes = {} if mode is None else {"request_mode": mode, "response_mode": mode}
    # BUFFERED sends the whole body as one message; the other modes in chunks.
    chunks = (
        [request_body(b"abcde", end=True)]
        if mode == BUFFERED
        else [request_body(b"abc"), request_body(b"de", end=True)]
    )
    await fake.converse([request_headers(route="hold-upper", **modes), *chunks])
    # hold wraps the body in <...>: 5 bytes in, 7 out.
    assert body_bytes(metrics, "hold-upper")["request_in"] == 5
    assert body_bytes(metrics, "hold-upper")["request_out"] == 7
    calls = value(metrics, "extproc_plugin_hook_seconds_count", plugin="hold", hook="on_request_body")
    assert calls == (1 if mode == BUFFERED else 2)
    assert value(metrics, "extproc_plugin_hook_seconds_count", plugin="upper", hook="on_request_body") == 1


async def test_pieces_streamed_back_count_as_out(envoy):
    fake, metrics = envoy
    await fake.converse([request_headers(route="pieces-upper"), request_body(b"hello"), request_body(b"", end=True)])
    # pieces: each chunk in two halves, then "x" + "y" + 2 MiB of "z" at the end.
    assert body_bytes(metrics, "pieces-upper")["request_out"] == 5 + 2 + 2 * 1024 * 1024
    assert body_bytes(metrics, "pieces-upper")["request_in"] == 5


async def test_failing_plugin_counts_a_failed_stream_and_a_plugin_error(envoy):
    fake, metrics = envoy
    await fake.converse(
        [request_headers(route="fail"), request_body(b"1"), request_body(b"2"), request_body(b"3", end=True)]
    )
    assert value(metrics, "extproc_streams_total", route="fail", outcome="failed") == 1
    assert value(metrics, "extproc_plugin_errors_total", plugin="fail") == 1
    assert value(metrics, "extproc_streams_total", route="fail", outcome="ok") == 0


async def test_cancelled_stream_counts_as_aborted(envoy):
    fake, metrics = envoy
    await fake.converse([request_headers(route="hold-upper"), request_body(b"abc")], cancel_after=1)
    assert value(metrics, "extproc_streams_total", route="hold-upper", outcome="aborted") == 1
