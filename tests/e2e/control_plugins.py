"""Plugins for the end-to-end tests of the control half of ext_proc (attributes, metadata,
header operations and mutation rules, body replacement, header changes with a BUFFERED body),
run behind a real Envoy and in PluginRunner alike by tests/e2e/test_kit_matches_envoy.py.

Not installed: the host loads this module through ``[server] plugin_modules =
["tests.e2e.control_plugins"]`` with the repository root on its ``PYTHONPATH``.
"""

from __future__ import annotations

import json

from extproc_host import Headers, Needs, Plugin, hookimpl


class Seen(Plugin):
    """Tells the client, in response headers, what Envoy told the host: the client's address
    and the response code (attributes), and the tenant an earlier filter put in metadata."""

    name = "seen"
    needs = Needs(
        request_headers=True,
        response_headers=True,
        request_attributes=["source.address"],
        response_attributes=["response.code"],
        reads_metadata=["acme.tenant"],
    )

    def on_response_headers(self, headers: Headers) -> None:
        attributes = self.stream.attributes
        headers.set("x-seen-source", str(attributes.get("source.address")))
        headers.set("x-seen-code", str(attributes.get("response.code")))
        headers.set("x-seen-attributes", ",".join(sorted(attributes)))
        headers.set("x-seen-metadata", json.dumps(self.stream.metadata, sort_keys=True))


class Marker(Plugin):
    """Sets the header the canary route matches on, without declaring that it re-routes."""

    name = "marker"

    def on_request_headers(self, headers: Headers) -> None:
        headers.set("x-upstream", "canary")


class HeaderOps(Plugin):
    """Every header operation: add, setdefault, replace, set (empty too), remove; a :path
    rewrite (allowed by default), an :authority and an x-envoy-* change (dropped by Envoy
    unless the route's mutation rules allow them); and response header changes."""

    name = "header-ops"

    def on_request_headers(self, headers: Headers) -> None:
        headers.add("x-list", "two")
        headers.setdefault("x-kept", "new")
        headers.setdefault("x-absent", "added")
        headers.replace("x-replaced", "new")
        headers.replace("x-missing", "never")
        headers.set("x-empty", "")
        headers.remove("x-drop")
        headers.set(":authority", "elsewhere.internal")
        headers.set("x-envoy-plugin-note", "set by a plugin")
        if headers.get(":path", "").startswith("/ops/rewrite"):
            headers.set(":path", "/ops/rewritten/inspect")

    def on_response_headers(self, headers: Headers) -> None:
        headers.add("x-answer", "one")
        headers.add("x-answer", "two")
        headers.remove("x-upstream")


class Routing(HeaderOps):
    """HeaderOps on a route that allows routing and Envoy headers to change."""

    name = "routing"
    needs = Needs(request_headers=True, response_headers=True, routing_headers=True, envoy_headers=True)


class Mock(Plugin):
    """Replaces bodies from header hooks: the request's when it asks (x-synthesize), the
    response's when it asks (x-mock)."""

    name = "mock"

    def on_request_headers(self, headers: Headers) -> bytes | None:
        return b"synthesized from headers" if headers.get("x-synthesize") else None

    def on_response_headers(self, headers: Headers) -> bytes | None:
        request = self.stream.request_headers
        if request is None or not request.get("x-mock"):
            return None
        headers.set("x-mocked", "yes")
        headers.set("content-type", "text/plain")
        return b"mocked answer"


class Upper(Plugin):
    """Upper-cases request bodies (after Mock: a body it replaced goes through it too)."""

    name = "upper-request"

    def on_request_body(self, chunk: bytes) -> bytes:
        return chunk.upper()


class Digest(Plugin):
    """Signs whole request bodies: a header computed from the body, and a longer body."""

    name = "digest"
    needs = Needs(request_headers=True, request_body="buffered")

    def on_request_body(self, body: bytes) -> bytes:
        assert self.stream.request_headers is not None
        self.stream.request_headers.set("x-body-length", str(len(body)))
        return body + b" (signed)"


@hookimpl
def register_plugins(register) -> None:
    for cls in (Seen, Marker, HeaderOps, Routing, Mock, Upper, Digest):
        register(cls)
