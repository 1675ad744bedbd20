"""Plugins that need different parts of an exchange, for the envoy-config tests (unit and e2e)."""

from __future__ import annotations

from extproc_host import Needs, Plugin, hookimpl


class ResponseOnly(Plugin):
    """Touches response bodies only; at the end appends what Envoy told the host about the
    stream: ``|request=<mode>,response=<mode>,response_headers=<seen?>``."""

    name = "response_only"

    def on_response_body(self, chunk: bytes) -> bytes:
        return chunk

    def on_response_body_end(self) -> bytes:
        seen = self.stream.response_headers is not None
        return (
            f"|request={self.stream.request_body_mode},response={self.stream.response_body_mode},"
            f"response_headers={seen}"
        ).encode()


class WholeRequest(Plugin):
    """Declares that it needs the whole request body at once."""

    name = "whole_request"
    needs = Needs(request_body="buffered")


class RequestTrailers(Plugin):
    """Looks at request trailers only."""

    name = "request_trailers"

    def on_request_trailers(self, trailers) -> None:
        trailers.set("x-seen", "1")


class StampResponse(Plugin):
    """Looks at response headers only."""

    name = "stamp_response"

    def on_response_headers(self, headers) -> None:
        headers.set("x-stamped", "1")


class CloseOnly(Plugin):
    """Implements close only: needs nothing from Envoy."""

    name = "close_only"

    def close(self, error: BaseException | None) -> None:
        pass


class Auditor(Plugin):
    """Reads the client's address and a jwt_authn payload; writes its verdict as metadata."""

    name = "auditor"
    needs = Needs(
        request_headers=True,
        request_attributes=["source.address"],
        response_attributes=["response.code"],
        reads_metadata=["envoy.filters.http.jwt_authn"],
        writes_metadata=["acme.audit"],
    )


class Router(Plugin):
    """Changes :authority and re-routes."""

    name = "router"
    needs = Needs(request_headers=True, reroutes=True, routing_headers=True)


class Streamer(Plugin):
    """Streams request bodies (and may skip them)."""

    name = "streamer"

    def on_request_body(self, chunk: bytes) -> bytes:
        return chunk


@hookimpl
def register_plugins(register):
    for cls in (ResponseOnly, WholeRequest, RequestTrailers, StampResponse, CloseOnly, Auditor, Router, Streamer):
        register(cls)
