"""The ext_proc messages the host reads and writes: pure adapters between Envoy's protobufs
and the plugin API's values, with no state and no I/O.

- body modes (:data:`NONE` ... :data:`FULL_DUPLEX`) and their names;
- Envoy's header maps as ``(name, value)`` pairs, and :class:`~extproc_host.plugin.Headers`
  changes as a ``HeaderMutation``;
- the answers that change nothing (built once), full-duplex body answers, and the local reply
  a :class:`~extproc_host.plugin.Reject` becomes;
- Envoy attributes and dynamic metadata (``google.protobuf.Struct``) as plain Python values and
  back, and a route's modes as the ``ProcessingMode`` of a mode override.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.type.v3 import http_status_pb2
from google.protobuf import duration_pb2, struct_pb2, wrappers_pb2

from .plugin import Headers, Reject
from .routes import RouteModes

_Mode = processing_mode_pb2.ProcessingMode.BodySendMode
NONE, STREAMED, BUFFERED, BUFFERED_PARTIAL, FULL_DUPLEX = (
    _Mode.NONE,
    _Mode.STREAMED,
    _Mode.BUFFERED,
    _Mode.BUFFERED_PARTIAL,
    _Mode.FULL_DUPLEX_STREAMED,
)
MODE_NAMES: dict[int, str] = {value: name for name, value in _Mode.items()}

#: Where Envoy puts the attributes the filter config asks for, and the route name among them.
ATTRIBUTES_KEY = "envoy.filters.http.ext_proc"
ROUTE_ATTRIBUTE = "xds.route_name"

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
# Envoy's ext_proc (1.40) ignores append_action and appends only on the older `append` flag.
_APPEND = wrappers_pb2.BoolValue(value=True)

#: Answers that change nothing, built once, by ProcessingRequest kind.
CONTINUE: dict[str, tuple[pb.ProcessingResponse, ...]] = {
    "request_headers": (pb.ProcessingResponse(request_headers=pb.HeadersResponse()),),
    "response_headers": (pb.ProcessingResponse(response_headers=pb.HeadersResponse()),),
    "request_body": (pb.ProcessingResponse(request_body=pb.BodyResponse()),),
    "response_body": (pb.ProcessingResponse(response_body=pb.BodyResponse()),),
    "request_trailers": (pb.ProcessingResponse(request_trailers=pb.TrailersResponse()),),
    "response_trailers": (pb.ProcessingResponse(response_trailers=pb.TrailersResponse()),),
}
NOTHING: tuple[pb.ProcessingResponse, ...] = ()

#: Largest full-duplex chunk sent back to Envoy: what Envoy itself sends (its 1 MiB buffer
#: limit); a plugin that emits more at once is answered in several chunks.
MAX_STREAMED_CHUNK = 1024 * 1024


def streamed(kind: str, body: bytes, end: bool) -> pb.ProcessingResponse:
    """A full-duplex body answer: ``body`` goes on as is, ``end`` closes the body.

    Built in place: with protobuf's upb backend, handing a message to a constructor copies
    it, so nesting constructors would copy a 1 MiB chunk once per level.
    """
    response = pb.ProcessingResponse()
    streamed = getattr(response, kind).response.body_mutation.streamed_response
    streamed.body = body
    streamed.end_of_stream = end
    return response


def streamed_pieces(kind: str, data: bytes, end: bool) -> list[pb.ProcessingResponse]:
    """``data`` as full-duplex chunks of at most MAX_STREAMED_CHUNK; ``end`` on the last."""
    size = len(data)
    return [
        streamed(kind, data[start : start + MAX_STREAMED_CHUNK], end and start + MAX_STREAMED_CHUNK >= size)
        for start in range(0, size, MAX_STREAMED_CHUNK)
    ]


def header_items(header_map: base_pb2.HeaderMap) -> list[tuple[str, str]]:
    """Envoy's HeaderMap as (name, value) pairs; Envoy fills ``raw_value``, older ones ``value``."""
    return [
        (h.key, h.raw_value.decode("utf-8", "surrogateescape") if h.raw_value else h.value) for h in header_map.headers
    ]


def request_path(req: pb.ProcessingRequest) -> str | None:
    """The ``:path`` of a request-headers message, if it is one and has it."""
    if req.HasField("request_headers"):
        for h in req.request_headers.headers.headers:
            if h.key == ":path":
                path: str = h.raw_value.decode("latin-1") if h.raw_value else h.value
                return path
    return None


def route_attribute(req: pb.ProcessingRequest) -> str | None:
    """The Envoy route name (``xds.route_name``) the first message carries, if any."""
    if ATTRIBUTES_KEY in req.attributes:
        value = req.attributes[ATTRIBUTES_KEY].fields.get(ROUTE_ATTRIBUTE)
        if value is not None:
            name: str = value.string_value
            return name or None
    return None


def header_mutation(headers: Headers, extra: dict[str, str] | None = None) -> pb.HeaderMutation | None:
    """The HeaderMutation for what plugins changed in ``headers`` (plus ``extra`` to set)."""
    if not headers.changed and not extra:
        return None
    mutation = pb.HeaderMutation(remove_headers=sorted(headers.removed))
    for name, value in {**headers.set_headers, **(extra or {})}.items():
        mutation.set_headers.append(
            base_pb2.HeaderValueOption(
                header=base_pb2.HeaderValue(key=name, raw_value=value.encode("utf-8", "surrogateescape")),
                append_action=_OVERWRITE,
            )
        )
    for name, value in headers.appended:
        mutation.set_headers.append(
            base_pb2.HeaderValueOption(
                header=base_pb2.HeaderValue(key=name, raw_value=value.encode("utf-8", "surrogateescape")),
                append=_APPEND,
            )
        )
    return mutation


def immediate_response(reject: Reject) -> pb.ProcessingResponse:
    """The local reply (Envoy's ImmediateResponse) a plugin's :class:`Reject` asks for."""
    headers = Headers()
    for name, value in reject.headers.items():
        headers.set(name, value)
    immediate = pb.ImmediateResponse(
        status=http_status_pb2.HttpStatus(code=reject.status), body=reject.body, details=reject.details
    )
    if reject.grpc_status is not None:
        immediate.grpc_status.status = reject.grpc_status
    mutation = header_mutation(headers)
    if mutation is not None:
        immediate.headers.CopyFrom(mutation)
    return pb.ProcessingResponse(immediate_response=immediate)


def replacing(kind: str, body: bytes, mutation: pb.HeaderMutation | None) -> pb.ProcessingResponse:
    """The answer to a header message that replaces the body after it (CONTINUE_AND_REPLACE)."""
    response = pb.ProcessingResponse()
    common = getattr(response, kind).response
    common.status = pb.CommonResponse.CONTINUE_AND_REPLACE
    if mutation is not None:
        common.header_mutation.CopyFrom(mutation)
    if body:
        common.body_mutation.body = body
    else:
        common.body_mutation.clear_body = True
    return response


def plain_value(value: struct_pb2.Value) -> Any:
    """A protobuf ``Value`` as a Python value; whole numbers as ``int`` (Envoy sends every
    number as a double: ``response.code`` 200.0)."""
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return value.string_value
    if kind == "number_value":
        number = value.number_value
        return int(number) if number.is_integer() else number
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return plain_struct(value.struct_value)
    if kind == "list_value":
        return [plain_value(item) for item in value.list_value.values]
    return None


def plain_struct(struct: struct_pb2.Struct) -> dict[str, Any]:
    """A protobuf ``Struct`` as a dict of Python values (see :func:`plain_value`)."""
    return {name: plain_value(value) for name, value in struct.fields.items()}


def attributes_of(req: pb.ProcessingRequest) -> dict[str, Any]:
    """The attributes a message carries, by attribute name."""
    found = req.attributes.get(ATTRIBUTES_KEY)
    return plain_struct(found) if found is not None else {}


def metadata_of(req: pb.ProcessingRequest) -> dict[str, dict[str, Any]]:
    """The dynamic metadata a message forwards (``metadata_context``), by namespace."""
    return {name: plain_struct(values) for name, values in req.metadata_context.filter_metadata.items()}


def metadata_struct(metadata: Mapping[str, Mapping[str, Any]]) -> struct_pb2.Struct:
    """Dynamic metadata by namespace as the ``Struct`` a ProcessingResponse carries."""
    struct = struct_pb2.Struct()
    struct.update({namespace: dict(values) for namespace, values in metadata.items()})
    return struct


def duration(seconds: float) -> duration_pb2.Duration:
    """Seconds as a protobuf Duration."""
    found = duration_pb2.Duration()
    found.FromMilliseconds(round(seconds * 1000))
    return found


_SEND, _SKIP = processing_mode_pb2.ProcessingMode.SEND, processing_mode_pb2.ProcessingMode.SKIP


@lru_cache(maxsize=256)
def processing_mode(modes: RouteModes) -> processing_mode_pb2.ProcessingMode:
    """The ProcessingMode of a mode override setting ``modes`` (every field explicit: Envoy
    compares it with the filter's allowed_override_modes); built once per modes, copy it."""
    return processing_mode_pb2.ProcessingMode(
        request_header_mode=_SEND,
        response_header_mode=_SEND if modes.response_headers else _SKIP,
        request_body_mode=_Mode.Value(modes.request_body),
        response_body_mode=_Mode.Value(modes.response_body),
        request_trailer_mode=_SEND if modes.request_trailers else _SKIP,
        response_trailer_mode=_SEND if modes.response_trailers else _SKIP,
    )
