"""jsonguard: refuses malformed JSON request bodies before the upstream sees the request.

It looks at the request headers first: a request that is not JSON (by its content-type) has
its body skipped (``skip_body``), and on a route with ``allow_mode_override = true`` Envoy is
told not to send that body at all, so only JSON bodies cost the host anything. A JSON body
comes whole (the plugin needs it ``"buffered"``: Envoy holds the request, headers included,
until the host answered), is parsed, and goes on unchanged; one that does not parse gets a
400 with the parser's message, and the upstream never sees the request. Envoy itself answers
413 to a body over the route's ``buffer_limit_bytes``.

    [routes.api]
    chain = ["jsonguard"]
    path_prefix = "/api"
    allow_mode_override = true    # skipped bodies are not even sent to the host
    buffer_limit_bytes = 1048576  # the largest JSON body Envoy holds
"""

from __future__ import annotations

import json

from extproc_host import Headers, Needs, Plugin, Reject, hookimpl


def is_json(content_type: str | None) -> bool:
    """``application/json`` and ``application/<anything>+json``, parameters aside."""
    kind = (content_type or "").partition(";")[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))


class JsonGuard(Plugin):
    """One instance per HTTP exchange: decides on the headers, checks a JSON body whole."""

    name = "jsonguard"
    # The whole body at once, and Envoy holding the request until it is checked.
    needs = Needs(request_headers=True, request_body="buffered")

    def on_request_headers(self, headers: Headers) -> None:
        if not is_json(headers.get("content-type")):
            self.skip_body("request")

    def on_request_body(self, body: bytes) -> bytes:
        try:
            json.loads(body)
        except ValueError as exc:
            error = json.dumps({"error": f"malformed JSON: {exc}"}) + "\n"
            raise Reject(400, error, {"content-type": "application/json"}) from None
        return body


@hookimpl
def register_plugins(register) -> None:
    register(JsonGuard)
