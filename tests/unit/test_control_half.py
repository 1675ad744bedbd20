"""The control half of ext_proc through the plugin API, in the test kit: attributes, dynamic
metadata both ways, header mutation rules, re-routing, mode overrides, body replacement,
header changes with a BUFFERED body, gRPC local replies, longer answer timeouts.

The kit applies what Envoy 1.40 applies with the config ``envoy-config`` generates for the same
settings (tests/e2e/test_kit_matches_envoy.py checks the two side by side)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

import grpc
import pytest
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from google.protobuf import struct_pb2

from extproc_host import Headers, Needs, Plugin, Reject, hookimpl
from extproc_host.errors import ConfigError
from extproc_host.processor import Router
from extproc_host.protocol import plain_struct
from extproc_host.registry import assemble_host
from extproc_host.server import ExternalProcessor
from extproc_host.settings import Settings
from extproc_host.testing import PluginRunner, request, response

from .fake_envoy import NONE, STREAMED, FakeEnvoy, request_headers, response_headers, serve

SKIP = processing_mode_pb2.ProcessingMode.SKIP

STREAMING = ["FULL_DUPLEX_STREAMED", "STREAMED"]


class Who(Plugin):
    """Reads the client's address and the response code; writes what it saw as metadata."""

    name = "who"
    needs = Needs(
        request_headers=True,
        response_headers=True,
        request_attributes=["source.address"],
        response_attributes=["response.code"],
        writes_metadata=["test.who"],
    )

    def on_request_headers(self, headers: Headers) -> None:
        self.stream.set_metadata("test.who", {"client": self.stream.attributes["source.address"]})

    def on_response_headers(self, headers: Headers) -> None:
        headers.set("x-code-seen", str(self.stream.attributes["response.code"]))
        headers.set("x-attributes", ",".join(sorted(self.stream.attributes)))
        self.stream.set_metadata("test.who", {"code": self.stream.attributes["response.code"]})


def test_attributes_are_the_union_of_what_each_direction_brought(plugin_runner) -> None:
    result = plugin_runner(Who).exchange(
        request(b"hi"), response(b"yo", status=201), attributes={"source.address": "203.0.113.9:5555"}
    )
    assert result.client.header("x-code-seen") == "201"
    # Asked for: these three; the kit knows more (request.path...) but Envoy would not send them.
    assert result.client.header("x-attributes") == "response.code,source.address,xds.route_name"
    assert result.metadata == {"test.who": {"client": "203.0.113.9:5555", "code": 201}}


class Writer(Plugin):
    """Writes metadata into the namespace its settings name (declared or not)."""

    name = "writer"
    needs = Needs(request_headers=True, writes_metadata=["test.declared"])

    def on_request_headers(self, headers: Headers) -> None:
        namespace = headers.get("x-namespace", "test.declared")
        self.stream.set_metadata(namespace, {"n": 1, "nested": {"list": [1, "two", None]}})


def test_metadata_goes_only_to_namespaces_the_route_receives(plugin_runner) -> None:
    runner = plugin_runner(Writer)
    ok = runner.exchange(request())
    assert ok.metadata == {"test.declared": {"n": 1, "nested": {"list": [1, "two", None]}}}
    undeclared = runner.exchange(request(headers={"x-namespace": "test.other"}))
    assert undeclared.failed is not None
    assert "does not receive dynamic metadata namespace 'test.other'" in str(undeclared.close_error)
    assert "routes.default.receiving_namespaces" in str(undeclared.close_error)
    # The operator can add a namespace for a plugin that decides it by settings or headers.
    extra = plugin_runner(Writer, receiving_namespaces=["test.other"]).exchange(
        request(headers={"x-namespace": "test.other"})
    )
    assert extra.metadata == {"test.other": {"n": 1, "nested": {"list": [1, "two", None]}}}


def test_set_metadata_refuses_values_metadata_cannot_hold(plugin_runner) -> None:
    class Bad(Plugin):
        name = "bad"
        needs = Needs(request_headers=True, writes_metadata=["test.bad"])

        def on_request_headers(self, headers: Headers) -> None:
            self.stream.set_metadata("test.bad", {"when": object()})

    result = plugin_runner(Bad).exchange(request())
    assert "test.bad.when is a object" in str(result.close_error)


class CountBytes(Plugin):
    """Counts response body bytes in full duplex and reports them as metadata at the end."""

    name = "count-bytes"
    needs = Needs(response_body="streamed", writes_metadata=["test.count"])

    def __init__(self, settings, stream) -> None:
        super().__init__(settings, stream)
        self.count = 0

    def on_response_body(self, chunk: bytes) -> bytes:
        self.count += len(chunk)
        return b""  # held back: the answers to these chunks carry nothing

    def on_response_body_end(self) -> bytes:
        self.stream.set_metadata("test.count", {"bytes": self.count})
        return b"%d bytes" % self.count


@pytest.mark.parametrize("mode", STREAMING)
def test_metadata_set_at_the_end_of_a_body_goes_with_its_last_answer(plugin_runner, mode: str) -> None:
    result = plugin_runner(CountBytes, response_mode=mode).exchange(request(b"x" * 10), splits=lambda b: [b[:4], b[4:]])
    assert result.client.body == b"10 bytes"
    assert result.metadata == {"test.count": {"bytes": 10}}


class Reader(Plugin):
    """Copies forwarded metadata into a request header."""

    name = "reader"
    needs = Needs(request_headers=True, reads_metadata=["envoy.filters.http.jwt_authn"])

    def on_request_headers(self, headers: Headers) -> None:
        headers.set("x-metadata", json.dumps(self.stream.metadata, sort_keys=True))


def test_only_the_forwarded_namespaces_reach_the_plugin(plugin_runner) -> None:
    earlier = {"envoy.filters.http.jwt_authn": {"sub": "alice"}, "secret.stuff": {"k": "v"}}
    result = plugin_runner(Reader).exchange(request(), metadata=earlier)
    assert json.loads(result.upstream.header("x-metadata")) == {"envoy.filters.http.jwt_authn": {"sub": "alice"}}
    # Envoy keeps every namespace for its access log; the plugin saw only the forwarded one.
    assert result.metadata == earlier


class JsonOnly(Plugin):
    """Takes request bodies of JSON requests only; upper-cases them."""

    name = "json-only"

    def on_request_headers(self, headers: Headers) -> None:
        if headers.get("content-type") != "application/json":
            self.skip_body("request")

    def on_request_body(self, chunk: bytes) -> bytes:
        return chunk.upper()


def test_a_skipped_body_passes_untouched_and_with_mode_override_never_reaches_the_host(plugin_runner) -> None:
    plain = request(b"not json", headers={"content-type": "text/plain"})
    as_json = request(b'{"a": 1}', headers={"content-type": "application/json"})
    without = plugin_runner(JsonOnly)
    assert without.modes.request_body == "FULL_DUPLEX_STREAMED"
    skipped = without.exchange(plain)
    assert skipped.upstream.body == b"not json"
    assert skipped.request_chunks == [8]  # Envoy still sent it: the route does not allow overrides
    assert not any(r.HasField("mode_override") for r in skipped.responses)

    with_override = plugin_runner(JsonOnly, allow_mode_override=True)
    assert with_override.modes.request_body == "STREAMED"  # Envoy ignores overrides in full duplex
    skipped = with_override.exchange(plain)
    assert skipped.upstream.body == b"not json"
    assert skipped.request_chunks == []  # Envoy never sent the body
    assert skipped.upstream.header("content-length") == "8"  # nor streamed it: the length stays
    taken = with_override.exchange(as_json)
    assert taken.upstream.body == b'{"A": 1}'
    assert taken.request_chunks == [8]


def test_mode_override_refuses_a_forced_full_duplex_route() -> None:
    with pytest.raises(ConfigError, match="allow_mode_override, which Envoy ignores in FULL_DUPLEX_STREAMED"):
        PluginRunner(JsonOnly, mode="FULL_DUPLEX_STREAMED", allow_mode_override=True)


def test_a_body_the_route_must_send_is_not_skipped(plugin_runner) -> None:
    runner = plugin_runner(JsonOnly, allow_mode_override=True, send=["request_body"])
    result = runner.exchange(request(b"abc", headers={"content-type": "text/plain"}))
    assert result.request_chunks == [3]
    assert result.upstream.body == b"abc"


class Canary(Plugin):
    """Sends requests with x-beta to the canary upstream."""

    name = "canary"
    needs = Needs(request_headers=True, reroutes=True)

    def on_request_headers(self, headers: Headers) -> None:
        if headers.get("x-beta") == "1":
            headers.set("x-upstream", "canary")


@hookimpl
def register_plugins(register) -> None:
    """This module is a plugin module too (``plugin_modules``), for the settings below."""
    register(Canary)


ROUTED = {
    "server": {"plugin_modules": ["tests.unit.test_control_half"]},
    "routes": {
        "default": {"chain": ["canary"]},
        "canary": {"chain": ["canary"], "match_headers": {"x-upstream": "canary"}, "upstream": "canary"},
    },
}


def test_a_chain_that_reroutes_makes_envoy_pick_the_route_again() -> None:
    runner = PluginRunner.from_settings(ROUTED)
    assert runner.host.routes["default"].control.route_cache_action == "CLEAR"
    answers = {"canary": response(b"from canary")}
    beta = runner.exchange(request(b"hi", headers={"x-beta": "1"}), upstreams=answers)
    assert (beta.route, beta.upstream_cluster) == ("canary", "canary")
    assert beta.client.body == b"from canary"
    stable = runner.exchange(request(b"hi"), upstreams=answers)
    assert (stable.route, stable.upstream_cluster) == ("default", "upstream")
    assert stable.client.body == b"hi"


def test_without_clearing_the_route_cache_the_route_stays() -> None:
    settings = json.loads(json.dumps(ROUTED))
    settings["routes"]["default"]["route_cache_action"] = "DEFAULT"  # and the host sets clear_route_cache
    assert PluginRunner.from_settings(settings).exchange(request(headers={"x-beta": "1"})).route == "canary"
    settings["routes"]["default"]["route_cache_action"] = "RETAIN"
    with pytest.raises(ConfigError, match="RETAIN, but 'canary' re-routes"):
        PluginRunner.from_settings(settings)


class Authority(Plugin):
    """Moves requests to another virtual host and sets an Envoy header."""

    name = "authority"
    needs = Needs(request_headers=True, routing_headers=True)

    def on_request_headers(self, headers: Headers) -> None:
        headers.set(":authority", "backend.internal")
        headers.set("x-envoy-plugin-note", "set by a plugin")
        headers.set("x-plain", "yes")


def test_routing_headers_need_the_route_to_allow_them() -> None:
    with pytest.raises(ConfigError, match=r"'authority' changes routing headers.*allow_all_routing = true"):
        PluginRunner(Authority)
    runner = PluginRunner(Authority, mutation_rules={"allow_all_routing": True})
    result = runner.exchange(request())
    assert result.upstream.header(":authority") == "backend.internal"
    assert result.upstream.header("x-envoy-plugin-note") is None  # dropped: no allow_envoy
    assert result.upstream.header("x-plain") == "yes"
    both = PluginRunner(Authority, mutation_rules={"allow_all_routing": True, "allow_envoy": True}).exchange(request())
    assert both.upstream.header("x-envoy-plugin-note") == "set by a plugin"


def test_undeclared_routing_header_changes_are_dropped_as_envoy_drops_them(plugin_runner) -> None:
    class Sneaky(Plugin):
        name = "sneaky"

        def on_request_headers(self, headers: Headers) -> None:
            headers.set(":authority", "elsewhere")
            headers.remove(":path")  # never removable
            headers.set("x-ok", "1")

    result = plugin_runner(Sneaky).exchange(request(path="/here", authority="example.com"))
    assert result.upstream.header(":authority") == "example.com"
    assert result.upstream.header(":path") == "/here"
    assert result.upstream.header("x-ok") == "1"


def test_disallow_is_error_fails_the_exchange_with_a_500(plugin_runner) -> None:
    class Sneaky(Plugin):
        name = "sneaky"

        def on_request_headers(self, headers: Headers) -> None:
            headers.set("host", "elsewhere")

    result = plugin_runner(Sneaky, mutation_rules={"disallow_is_error": True}).exchange(request())
    assert result.upstream is None
    assert result.client.status == 500
    assert result.local_reply is not None and result.local_reply.by == "envoy"
    assert result.local_reply.details == "Invalid attempt to modify host"


class Headers3(Plugin):
    """add appends, setdefault and replace act only by what is there."""

    name = "headers3"

    def on_request_headers(self, headers: Headers) -> None:
        headers.add("x-list", "two")
        headers.setdefault("x-kept", "new")
        headers.setdefault("x-absent", "added")
        headers.replace("x-replaced", "new")
        headers.replace("x-missing", "never")
        headers.set("x-empty", "")


def test_header_operations_as_envoy_applies_them(plugin_runner) -> None:
    sent = {"x-list": "one", "x-kept": "old", "x-replaced": "old"}
    up = plugin_runner(Headers3).exchange(request(headers=sent)).upstream
    assert up.header_values("x-list") == ["one", "two"]
    assert up.header("x-kept") == "old"
    assert up.header("x-absent") == "added"
    assert up.header("x-replaced") == "new"
    assert up.header("x-missing") is None
    assert up.header("x-empty") == ""
    # Envoy ignores append_action: add goes out on the `append` flag, which it honours.
    mutation = plugin_runner(Headers3).exchange(request(headers=sent)).responses[0].request_headers.response
    appended = [o for o in mutation.header_mutation.set_headers if o.header.key == "x-list"]
    assert [o.append.value for o in appended] == [True]


class Mock(Plugin):
    """Answers from headers: a synthesized request body, a mocked response body."""

    name = "mock"

    def on_request_headers(self, headers: Headers) -> bytes | None:
        return b"synthesized" if headers.get("x-synthesize") else None

    def on_response_headers(self, headers: Headers) -> bytes:
        headers.set("x-mocked", "yes")
        return b"mocked answer"


class Upper(Plugin):
    name = "upper"

    def on_request_body(self, chunk: bytes) -> bytes:
        return chunk.upper()

    def on_response_body(self, chunk: bytes) -> bytes:
        return chunk.upper()


@pytest.mark.parametrize("mode", ["FULL_DUPLEX_STREAMED", "STREAMED", "BUFFERED"])
def test_a_header_hook_returning_bytes_replaces_the_body(plugin_runner, mode: str) -> None:
    runner = plugin_runner(Mock, Upper, mode=mode, buffer_limit_bytes=1024 if mode == "BUFFERED" else None)
    result = runner.exchange(request(b"original", headers={"x-synthesize": "1"}))
    # The new body goes through the plugins after the one that returned it.
    assert result.upstream.body == b"SYNTHESIZED"
    assert result.upstream.header("content-length") is None
    assert result.client.body == b"MOCKED ANSWER"
    assert result.client.header("x-mocked") == "yes"
    get = runner.exchange(request(method="GET", headers={"x-synthesize": "1"}))
    assert get.upstream.body == b"SYNTHESIZED"  # a request that had no body gets one


def test_bodies_are_replaced_on_routes_that_do_not_send_them(plugin_runner) -> None:
    result = plugin_runner(Mock, mode="NONE").exchange(request(b"original", headers={"x-synthesize": "1"}))
    assert result.upstream.body == b"synthesized"
    assert result.client.body == b"mocked answer"


class Digest(Plugin):
    """Signs request bodies: a header computed from the whole body."""

    name = "digest"
    needs = Needs(request_body="buffered")

    def on_request_body(self, body: bytes) -> bytes:
        assert self.stream.request_headers is not None
        self.stream.request_headers.set("x-length-seen", str(len(body)))
        return body + b"!"


def test_body_hooks_change_headers_with_a_buffered_body(plugin_runner) -> None:
    result = plugin_runner(Digest, buffer_limit_bytes=1024).exchange(request(b"abc"))
    assert result.upstream.header("x-length-seen") == "3"
    assert result.upstream.header("content-length") == "4"
    assert result.upstream.body == b"abc!"


class Deny(Plugin):
    name = "deny"

    def on_request_headers(self, headers: Headers) -> None:
        raise Reject(403, "no entry", grpc_status="PERMISSION_DENIED", details="denied by policy")


def test_reject_answers_grpc_clients_with_a_grpc_status(plugin_runner) -> None:
    runner = plugin_runner(Deny)
    grpc = runner.exchange(request(b"\0\0\0\0\0", headers={"content-type": "application/grpc"}))
    assert grpc.client.status == 200
    assert grpc.client.header("grpc-status") == "7"
    assert grpc.client.header("grpc-message") == "no entry"
    assert grpc.local_reply is not None and grpc.local_reply.details == "denied by policy"
    http = runner.exchange(request(b"x"))
    assert http.client.status == 403
    assert http.client.body == b"no entry"
    assert http.client.header("content-type") == "text/plain"


def test_reject_knows_the_grpc_status_names() -> None:
    assert Reject(401, grpc_status="unauthenticated").grpc_status == 16
    with pytest.raises(ValueError, match="not a gRPC status name"):
        Reject(401, grpc_status="NOPE")


class Slow(Plugin):
    name = "slow"

    def on_request_headers(self, headers: Headers) -> None:
        self.stream.extend_timeout(float(headers.get("x-wait", "2")))


def test_a_plugin_asks_envoy_for_more_time(plugin_runner) -> None:
    runner = plugin_runner(Slow, max_message_timeout=10)
    assert runner.exchange(request()).timeout_extensions == [2.0]
    too_long = runner.exchange(request(headers={"x-wait": "30"}))
    assert "route 'default' lets plugins ask for 0.001 to 10 s" in str(too_long.close_error)
    assert "routes.default.max_message_timeout" in str(too_long.close_error)
    # Without a max_message_timeout a plugin may not ask at all.
    assert plugin_runner(Slow).exchange(request()).failed is not None


# -- through the host's gRPC server, as Envoy talks to it ------------------------------------


@contextlib.asynccontextmanager
async def served(settings: dict, *plugins: type[Plugin]) -> AsyncIterator[FakeEnvoy]:
    """The host's server for ``settings`` (routes with their modes and control, as serve
    builds them) and a client playing Envoy."""
    host = assemble_host(Settings(**settings), "test", extra=plugins)
    async with serve(host.settings, ExternalProcessor(Router(host.routes), host.pm)) as envoy:
        yield envoy


def with_attributes(req, **values):
    attrs = struct_pb2.Struct()
    attrs.update(values)
    req.attributes["envoy.filters.http.ext_proc"].CopyFrom(attrs)
    return req


async def test_the_host_keeps_the_attributes_of_every_message() -> None:
    settings = {"routes": {"default": {"chain": ["who"]}}}
    async with served(settings, Who) as envoy:
        first = with_attributes(
            request_headers("/", request_mode=NONE, response_mode=NONE, end_of_stream=True),
            **{"xds.route_name": "default", "source.address": "10.1.2.3:4444"},
        )
        later = with_attributes(response_headers(end_of_stream=True), **{"response.code": 404.0})
        conversation = await envoy.converse([first, later])
    (answer,) = conversation.of("response_headers")
    set_headers = {
        o.header.key: o.header.raw_value.decode() for o in answer.response_headers.response.header_mutation.set_headers
    }
    assert set_headers["x-code-seen"] == "404"
    assert set_headers["x-attributes"] == "response.code,source.address,xds.route_name"
    metadata = [plain_struct(r.dynamic_metadata) for r in conversation.responses if r.HasField("dynamic_metadata")]
    assert metadata == [{"test.who": {"client": "10.1.2.3:4444"}}, {"test.who": {"code": 404}}]


async def test_the_mode_override_says_every_mode() -> None:
    settings = {"routes": {"default": {"chain": ["json-only"], "allow_mode_override": True}}}
    async with served(settings, JsonOnly) as envoy:
        conversation = await envoy.converse(
            [
                request_headers("/", request_mode=STREAMED, response_mode=NONE, extra={"content-type": "text/plain"}),
                response_headers(end_of_stream=True),
            ]
        )
    (answer,) = conversation.of("request_headers")
    mode = answer.mode_override
    assert (mode.request_body_mode, mode.response_body_mode) == (NONE, NONE)
    assert (mode.request_trailer_mode, mode.response_header_mode, mode.response_trailer_mode) == (SKIP, SKIP, SKIP)
    assert conversation.code == grpc.StatusCode.OK  # no request body came: the exchange is complete


async def test_more_time_goes_out_while_the_hook_still_works() -> None:
    class Waits(Plugin):
        name = "waits"

        async def on_request_headers(self, headers: Headers) -> None:
            self.stream.extend_timeout(7.5)
            await asyncio.sleep(0.05)
            headers.set("x-done", "1")

    settings = {"routes": {"default": {"chain": ["waits"], "max_message_timeout": 10}}}
    async with served(settings, Waits) as envoy:
        conversation = await envoy.converse(
            [request_headers("/", request_mode=NONE, response_mode=NONE, end_of_stream=True)]
        )
    first, second = conversation.responses
    assert first.WhichOneof("response") is None and first.override_message_timeout.ToMilliseconds() == 7500
    assert second.HasField("request_headers")
