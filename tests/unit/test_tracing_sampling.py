"""Which streams keep a span: the sampler's decision, made once per stream from the trace
context it arrives with. A stream left out keeps nothing (no span, no hook spans)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from extproc_host.settings import TracingSettings
from extproc_host.tracing import Tracing

SAMPLED = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
NOT_SAMPLED = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"


def tracing_at(ratio: float) -> Iterator[Tracing]:
    # An endpoint nobody listens on: the spans these tests start are never ended, so nothing is
    # exported.
    tracing = Tracing(TracingSettings(enabled=True, endpoint="http://127.0.0.1:9", sample_ratio=ratio))
    yield tracing
    tracing.provider.shutdown()


@pytest.fixture
def never() -> Iterator[Tracing]:
    yield from tracing_at(0.0)


@pytest.fixture
def always() -> Iterator[Tracing]:
    yield from tracing_at(1.0)


def test_a_stream_without_trace_context_is_sampled_at_the_ratio(never: Tracing, always: Tracing) -> None:
    assert never.stream("r", "1", {}, {}) is None
    kept = always.stream("r", "1", {}, {"extproc.request_body_mode": "STREAMED"})
    assert kept is not None and kept.span.is_recording()
    assert kept.span.attributes["extproc.request_body_mode"] == "STREAMED"


def test_a_stream_follows_the_sampling_decision_it_arrives_with(never: Tracing, always: Tracing) -> None:
    kept = never.stream("r", "1", {"traceparent": SAMPLED}, {})
    assert kept is not None
    assert format(kept.span.get_span_context().trace_id, "032x") == SAMPLED.split("-")[1]
    assert kept.span.parent.span_id == int(SAMPLED.split("-")[2], 16)
    assert always.stream("r", "1", {"traceparent": NOT_SAMPLED}, {}) is None
