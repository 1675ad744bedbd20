"""OpenTelemetry traces (``[server.tracing]``, the ``tracing`` extra): a span per ext_proc stream,
a child span per plugin hook call, and events for limits, rejections and failures.

A stream's span continues the trace its exchange belongs to: the W3C ``traceparent`` Envoy puts
on the ext_proc call when its own tracing is on (so the host's span is a child of Envoy's span
for the call), else the one the client sent with the request. Spans are exported over OTLP/gRPC
by the OpenTelemetry SDK in a background thread (``BatchSpanProcessor``; its ``OTEL_BSP_*``
environment variables apply). With tracing off nothing here is imported and the hot path
checks one attribute per hook call.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from .errors import ConfigError, LimitExceeded, PluginError, StreamAborted
from .plugin import Reject
from .settings import TracingSettings

#: The W3C trace context fields read from the ext_proc call's metadata or the request's headers.
TRACE_FIELDS = ("traceparent", "tracestate")


def require_sdk() -> None:
    """Raise :class:`ConfigError`, saying how to repair it, when OpenTelemetry's SDK or its
    OTLP/gRPC exporter does not import (``extproc-host check`` asks before a start would)."""
    try:
        import opentelemetry.exporter.otlp.proto.grpc.trace_exporter
        import opentelemetry.sdk.trace  # noqa: F401
    except ImportError as exc:
        raise ConfigError(sdk_missing(exc)) from None


def sdk_missing(exc: ImportError) -> str:
    """Why OpenTelemetry's SDK did not import: the ``tracing`` extra not installed, or
    opentelemetry-proto's modules replaced by the 2021 copies xds-protos ships under the same
    names (grpc/grpc#42926: whichever of the two packages pip installs last owns the files)."""
    try:
        common = importlib.import_module("opentelemetry.proto.common.v1.common_pb2")
        proto = version("opentelemetry-proto")
    except (ImportError, PackageNotFoundError):
        return f"[server.tracing] enabled needs OpenTelemetry's SDK: pip install 'extproc-host[tracing]' ({exc})"
    if not hasattr(common, "InstrumentationScope"):
        return (
            "[server.tracing] enabled needs opentelemetry-proto's modules, and xds-protos installed its older "
            "copies over them (both ship opentelemetry/proto/, grpc/grpc#42926); put them back with: "
            f"pip install --force-reinstall --no-deps opentelemetry-proto=={proto}"
        )
    return f"[server.tracing] enabled: OpenTelemetry's SDK does not import ({exc}); pip install 'extproc-host[tracing]'"


class Tracing:
    """The tracer of one host process; :meth:`stream` starts a stream's span."""

    def __init__(self, settings: TracingSettings) -> None:
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
            from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
            from opentelemetry.trace import SpanKind, Status, StatusCode, set_span_in_context
            from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
        except ImportError as exc:
            raise ConfigError(sdk_missing(exc)) from None
        self.provider = TracerProvider(
            resource=Resource.create({"service.name": settings.service_name}),
            sampler=ParentBased(TraceIdRatioBased(settings.sample_ratio)),
        )
        exporter = OTLPSpanExporter(endpoint=settings.endpoint, insecure=settings.endpoint.startswith("http://"))
        self.provider.add_span_processor(BatchSpanProcessor(exporter))
        self.tracer = self.provider.get_tracer("extproc_host")
        self.propagator = TraceContextTextMapPropagator()
        self.set_span_in_context = set_span_in_context
        self.server_kind = SpanKind.SERVER
        self.error_status = Status(StatusCode.ERROR)

    def stream(
        self, route: str, stream_id: str, carrier: dict[str, str], attributes: dict[str, Any]
    ) -> StreamTrace | None:
        """A stream's span, child of the trace context in ``carrier`` (``traceparent``), with
        ``attributes``; None when the sampler leaves the stream out (its hook spans would be
        left out as well: nothing of it is exported, so nothing of it is kept)."""
        span = self._span(route, stream_id, carrier, attributes)
        return StreamTrace(self, span) if span.is_recording() else None

    def _span(self, route: str, stream_id: str, carrier: dict[str, str], attributes: dict[str, Any]) -> Any:
        parent = self.propagator.extract(carrier) if carrier else None
        return self.tracer.start_span(
            f"ext_proc {route}",
            context=parent,
            kind=self.server_kind,
            attributes={"extproc.route": route, "extproc.stream_id": stream_id, **attributes},
        )

    def refused(self, route: str, reason: str, message: str, carrier: dict[str, str]) -> None:
        """A span for a stream the host refused (no plugin ran for it), with the reason."""
        span = self._span(route, "refused", carrier, {})
        span.add_event("refused", {"extproc.reason": reason, "reason": message[:512]})
        span.set_status(self.error_status)
        span.end()

    def shutdown(self) -> None:
        """Export what is left (the host is stopping)."""
        self.provider.shutdown()


class StreamTrace:
    """One stream's span: hook spans under it, events on it, its end."""

    __slots__ = ("context", "span", "tracing")

    def __init__(self, tracing: Tracing, span: Any) -> None:
        self.tracing = tracing
        self.span = span
        self.context = tracing.set_span_in_context(span)

    def hook(self, plugin: str, hook: str) -> Any:
        """A started span for one hook call (the caller ends it)."""
        return self.tracing.tracer.start_span(
            f"{plugin}.{hook}", context=self.context, attributes={"extproc.plugin": plugin, "extproc.hook": hook}
        )

    def failed_hook(self, span: Any, error: BaseException) -> None:
        """A hook span whose call raised."""
        span.record_exception(error)
        span.set_status(self.tracing.error_status)

    def event(self, name: str, attributes: dict[str, Any]) -> None:
        self.span.add_event(name, attributes)

    def end(self, error: BaseException | None, attributes: dict[str, Any]) -> None:
        """End the stream's span: an event for how it ended badly, if it did."""
        span = self.span
        span.set_attributes(attributes)
        if isinstance(error, Reject):
            span.add_event("rejected", {"http.status": error.status, "reason": str(error)[:512]})
        elif isinstance(error, PluginError):
            span.add_event("plugin failed", {"extproc.plugin": error.plugin, "extproc.hook": error.hook})
            span.record_exception(error.error)
            span.set_status(self.tracing.error_status)
        elif isinstance(error, LimitExceeded):
            span.add_event("limit", {"extproc.setting": f"[server] {error.setting}", "reason": str(error)[:512]})
            span.set_status(self.tracing.error_status)
        elif isinstance(error, StreamAborted):
            span.add_event("aborted", {"reason": str(error)[:512]})
        elif error is not None:
            span.record_exception(error)
            span.set_status(self.tracing.error_status)
        span.end()


def trace_carrier(fields: Any) -> dict[str, str]:
    """The trace context fields of ``fields`` (``(name, value)`` pairs, names lower-case)."""
    return {name: value for name, value in fields if name in TRACE_FIELDS}
