"""What Envoy 1.40's ext_proc filter does with the host's answers, and what it sends besides
the messages, for :class:`~extproc_host.testing.PluginRunner`: each rule here was checked
against the real Envoy binary (``tests/e2e/test_kit_matches_envoy.py`` keeps checking them).

- header mutations: removals first, then each ``set_headers`` entry, each under the route's
  ``mutation_rules`` (:func:`extproc_host.mutation_rules.check`): a change they do not allow
  is dropped, or fails the exchange with a 500 (``disallow_is_error``). Envoy's ext_proc
  ignores ``append_action`` and ``keep_empty_value``: an entry appends only with the older
  ``append`` flag, otherwise it replaces; empty values are kept;
- local replies: a plugin's ``Reject``, as a plain HTTP reply or, for a gRPC request, as
  gRPC's trailers-only answer (``:status 200``, ``grpc-status``, ``grpc-message``);
- attributes: only those the route asks for, request ones with the first request message,
  response ones with the first response message;
- routes: Envoy's match (path prefix, then ``match_headers``) when it picks the route again.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from ..mutation_rules import MutationRules, check
from ..routes import Route

Pairs = list[tuple[str, str]]

#: Envoy's header_value validity, as far as a mutation goes: an error, not a dropped change.
_BAD_VALUE = ("\r", "\n", "\0")


class MutationFailed(Exception):
    """Envoy refuses a whole answer: a change the rules forbid with ``disallow_is_error``, or
    an invalid header; the exchange ends with a 500 local reply whose details say why."""

    def __init__(self, details: str) -> None:
        self.details = details
        super().__init__(details)


def apply_mutation(
    headers: Sequence[tuple[str, str]],
    mutation: pb.HeaderMutation,
    rules: MutationRules | None,
    *,
    replacing: bool = False,
) -> Pairs:
    """``headers`` after a HeaderMutation, as Envoy applies it under ``rules``.
    ``replacing``: the answer replaces the message (CONTINUE_AND_REPLACE), where Envoy lets
    ``:method`` change whatever the rules say."""
    out = list(headers)
    for raw_name in mutation.remove_headers:
        name = raw_name.lower()
        verdict = check(rules, "remove", name)
        if verdict == "fail":
            raise MutationFailed(f"Invalid attempt to remove {name}")
        if verdict == "ok":
            out = [(k, v) for k, v in out if k != name]
    for option in mutation.set_headers:
        if not option.HasField("header"):
            continue
        name = option.header.key.lower()
        raw = option.header.raw_value
        value = raw.decode("utf-8", "surrogateescape") if raw else option.header.value
        if any(c in value for c in _BAD_VALUE) or not name:
            raise MutationFailed("Invalid character in set_headers mutation.")
        append = option.append.value and any(k == name for k, _ in out)
        verdict = check(rules, "append" if append else "set", name, value)
        if replacing and name == ":method":
            verdict = "ok"
        if verdict == "fail":
            raise MutationFailed(f"Invalid attempt to modify {name}")
        if verdict == "ignore":
            continue
        if not option.append.value:
            out = [(k, v) for k, v in out if k != name]
        out.append((name, value))
    return out


def is_grpc(headers: Sequence[tuple[str, str]]) -> bool:
    """Whether a request is gRPC (its content-type), so its local replies are gRPC's."""
    content_type = next((v for k, v in headers if k == "content-type"), "")
    return content_type.startswith("application/grpc")


#: Envoy's gRPC status for an HTTP status of a local reply that names none.
_GRPC_FOR_HTTP = {400: 13, 401: 16, 403: 7, 404: 12, 429: 14, 502: 14, 503: 14, 504: 14}


def _percent_encoded(text: bytes) -> str:
    """gRPC's grpc-message encoding: printable ASCII but '%' as is, the rest %XX."""
    return "".join(chr(b) if 0x20 <= b <= 0x7E and b != 0x25 else f"%{b:02X}" for b in text)


def local_reply_headers(
    status: int, body: bytes, headers: Sequence[tuple[str, str]], grpc_status: int | None, grpc: bool
) -> tuple[Pairs, bytes]:
    """The headers and body the client gets for Envoy's local reply: for a gRPC request a
    trailers-only gRPC answer (HTTP 200, the body in ``grpc-message``), else the status with
    ``content-type: text/plain`` when there is a body and no content-type; a content-length."""
    given = [(k.lower(), v) for k, v in headers if k.lower() != "content-length"]
    if grpc:
        code = grpc_status if grpc_status is not None else _GRPC_FOR_HTTP.get(status, 2)
        out = [(":status", "200"), ("content-type", "application/grpc"), ("grpc-status", str(code))]
        if body:
            out.append(("grpc-message", _percent_encoded(body)))
        names = {k for k, _ in out}
        return [*out, *((k, v) for k, v in given if k not in names), ("content-length", "0")], b""
    out = [(":status", str(status))]
    if body and not any(k == "content-type" for k, _ in given):
        out.append(("content-type", "text/plain"))
    return [*out, *given, ("content-length", str(len(body)))], body


def pick_route(routes: Sequence[Route], headers: Sequence[tuple[str, str]]) -> Route:
    """The route Envoy picks for request ``headers`` among ``routes`` in Envoy's order
    (:func:`extproc_host.modes.ordered_routes`)."""
    path = next((v for k, v in headers if k == ":path"), "/")
    first: dict[str, str] = {}
    for name, value in headers:
        first.setdefault(name, value)
    return next(route for route in routes if route.matches(path, first) or route.name == "default")


def request_attributes(
    names: Sequence[str], route: Route, headers: Sequence[tuple[str, str]], given: Mapping[str, Any]
) -> dict[str, Any]:
    """The request attributes Envoy sends with the first request message: those the route
    asks for, from the request, the route and ``given`` (what the kit cannot know: the
    client's address, TLS); one it cannot give is left out, as Envoy leaves it out."""
    first = dict(reversed(list(headers)))
    path = first.get(":path", "/")
    known: dict[str, Any] = {
        "xds.route_name": route.name,
        "xds.cluster_name": route.upstream,
        "request.path": path,
        "request.url_path": path.partition("?")[0],
        "request.query": path.partition("?")[2],
        "request.host": first.get(":authority", ""),
        "request.scheme": first.get(":scheme", "http"),
        "request.method": first.get(":method", "GET"),
        "request.protocol": "HTTP/1.1",
        "request.headers": "CelMap value",  # Envoy sends maps as this string
        "source.address": "127.0.0.1:40000",
        "source.port": 40000,
        "destination.address": "127.0.0.1:10000",
        "destination.port": 10000,
        "connection.mtls": False,
    }
    if "x-request-id" in first:
        known["request.id"] = first["x-request-id"]
    if first.get("content-length", "").isdigit():
        known["request.size"] = int(first["content-length"])
    known.update(given)
    return {name: known[name] for name in names if name in known}


def response_attributes(
    names: Sequence[str], headers: Sequence[tuple[str, str]], given: Mapping[str, Any]
) -> dict[str, Any]:
    """The response attributes Envoy sends with the first response message."""
    first = dict(reversed(list(headers)))
    known: dict[str, Any] = {
        "response.headers": "CelMap value",
        "response.code_details": "via_upstream",
    }
    if first.get(":status", "").isdigit():
        known["response.code"] = int(first[":status"])
    known.update(given)
    return {name: known[name] for name in names if name in known}
