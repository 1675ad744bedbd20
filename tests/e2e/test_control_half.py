"""The control half of ext_proc through a real Envoy with the config ``envoy-config`` generates:
metadata a plugin sets in Envoy's access log, metadata an earlier Envoy filter set reaching a
plugin, attributes of both directions, a request re-routed to a second upstream by a header a
plugin set, a body Envoy never sends the host (mode override, counted by the host's metrics),
a gRPC client getting a plugin's gRPC status.

One stack for the module: the example plugins (examples/*) and tests/e2e/control_plugins.py
loaded through plugin_modules, a second upstream (``canary``), and Envoy's config generated
with an access log, plus a header_to_metadata filter before ext_proc (the earlier filter)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from ops_helpers import sample, scrape, wait_until

from extproc_host.stack import Stack

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = [ROOT / "examples" / name / "src" for name in ("extproc-apikey", "extproc-canary", "extproc-jsonguard")]

SETTINGS = """
[server]
plugin_modules = ["extproc_apikey", "extproc_canary", "extproc_jsonguard", "tests.e2e.control_plugins"]
metrics_listen = "127.0.0.1:0"

[routes.auth]
chain = ["apikey"]
path_prefix = "/auth"

[routes.seen]
chain = ["seen"]
path_prefix = "/seen"

[routes.json]
chain = ["jsonguard"]
path_prefix = "/json"
allow_mode_override = true
buffer_limit_bytes = 1048576

# The same, on a filter of its own (another message timeout) whose allow_mode_override the
# test turns off in Envoy's config: Envoy then ignores the host's mode overrides.
[routes.json-ignored]
chain = ["jsonguard"]
path_prefix = "/ignored"
allow_mode_override = true
buffer_limit_bytes = 1048576
message_timeout = 4.0

[routes.canary]
chain = ["canary"]
match_headers = { "x-upstream" = "canary" }
upstream = "canary"

# A chain that sets the header the canary route matches on, but does not re-route.
[routes.marked]
chain = ["marker"]
match_headers = { "x-mark" = "1" }

[routes.default]
chain = ["canary"]

[plugins.apikey]
keys = { "k-alice" = "alice" }

[plugins.canary]
percent = 0
users = ["alice"]
"""

#: The filter before ext_proc: x-tenant goes into dynamic metadata, namespace acme.tenant (which
#: the seen plugin reads), x-secret into acme.secret (which no route forwards).
HEADER_TO_METADATA = {
    "name": "envoy.filters.http.header_to_metadata",
    "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.header_to_metadata.v3.Config",
        "request_rules": [
            {"header": name, "on_header_present": {"metadata_namespace": namespace, "key": "id", "type": "STRING"}}
            for name, namespace in (("x-tenant", "acme.tenant"), ("x-secret", "acme.secret"))
        ],
    },
}


def edit_envoy(config: dict[str, Any]) -> None:
    """The earlier filter, and no mode overrides on the json-ignored route's filter."""
    manager = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    manager["http_filters"].insert(0, HEADER_TO_METADATA)
    (ignoring,) = [f for f in manager["http_filters"] if f["name"] == "envoy.filters.http.ext_proc.json-ignored"]
    ignoring["typed_config"]["allow_mode_override"] = False


@pytest.fixture(scope="module")
def access_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("control-half-log") / "access.log"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, access_log: Path) -> Iterator[Stack]:
    settings = tmp_path_factory.mktemp("control-half") / "host.toml"
    settings.write_text(SETTINGS)
    path = os.pathsep.join([str(ROOT), *map(str, EXAMPLES)])
    with Stack(
        None,
        settings,
        host_env={"PYTHONPATH": path},
        upstreams=["canary"],
        envoy_config_args=["--access-log", str(access_log)],
        envoy_args=["--file-flush-interval-msec", "50"],  # the log reaches the file at once
        envoy_edit=edit_envoy,
    ) as running:
        yield running


def access_log_entry(access_log: Path, request_id: str) -> dict[str, Any]:
    def find() -> dict[str, Any] | None:
        if not access_log.exists():
            return None
        for line in access_log.read_text().splitlines():
            entry = json.loads(line)
            if entry["request_id"] == request_id:
                return entry
        return None

    found = wait_until(find, 10, f"the access log line of request {request_id}")
    assert isinstance(found, dict)
    return found


def test_the_access_log_line_carries_the_metadata_a_plugin_set(stack: Stack, access_log: Path) -> None:
    ok = httpx.get(stack.url + "/auth/orders", headers={"authorization": "Bearer k-alice", "x-request-id": "auth-1"})
    refused = httpx.get(stack.url + "/auth/orders", headers={"authorization": "Bearer nope", "x-request-id": "auth-2"})
    assert (ok.status_code, refused.status_code) == (200, 401)
    expected = {"extproc.auth": {"authenticated": True, "user": "alice"}}
    assert access_log_entry(access_log, "auth-1")["metadata"] == expected
    entry = access_log_entry(access_log, "auth-2")
    assert entry["metadata"] == {"extproc.auth": {"authenticated": False, "reason": "unknown API key"}}
    assert (entry["response_code"], entry["route"]) == (401, "auth")


def test_metadata_an_earlier_filter_set_reaches_the_plugin_with_both_directions_attributes(stack: Stack) -> None:
    reply = httpx.post(stack.url + "/seen/x", content=b"hi", headers={"x-tenant": "acme-7", "x-secret": "s3"})
    assert reply.status_code == 200
    # Only the namespace the route forwards: acme.secret is in Envoy's metadata too.
    assert reply.headers["x-seen-metadata"] == json.dumps({"acme.tenant": {"id": "acme-7"}})
    # The request's attributes came with the request headers, the response's with the response headers.
    host, _, port = reply.headers["x-seen-source"].rpartition(":")
    assert host == "127.0.0.1" and port.isdigit()
    assert reply.headers["x-seen-code"] == "200"
    assert reply.headers["x-seen-attributes"] == "response.code,source.address,xds.route_name"


def test_a_header_a_plugin_set_routes_the_request_to_the_second_upstream(stack: Stack) -> None:
    alice = httpx.post(stack.url + "/", content=b"hello", headers={"x-user": "alice"})
    bob = httpx.post(stack.url + "/", content=b"hello", headers={"x-user": "bob", "x-upstream": "canary"})
    assert (alice.status_code, alice.headers["x-upstream"], alice.content) == (200, "canary", b"hello")
    assert (bob.status_code, bob.headers["x-upstream"], bob.content) == (200, "upstream", b"hello")


def test_a_body_the_chain_skips_never_reaches_the_host(stack: Stack) -> None:
    assert stack.metrics_url is not None

    def counts() -> tuple[float, float]:
        samples = scrape(stack.metrics_url)
        body = sample(samples, "extproc_body_bytes_total", route="json", direction="request", way="in")
        return body, sample(samples, "extproc_streams_total", route="json", outcome="ok")

    before = counts()
    image = os.urandom(200_000)
    other = httpx.post(stack.url + "/json/upload", content=image, headers={"content-type": "image/png"}, timeout=30)
    assert other.status_code == 200 and other.content == image
    wait_until(lambda: counts()[1] == before[1] + 1, 10, "the host to count the non-JSON stream")
    assert counts()[0] == before[0]  # its headers reached the host, its body did not
    body = b'{"items": [1, 2, 3]}'
    valid = httpx.post(stack.url + "/json/orders", content=body, headers={"content-type": "application/json"})
    assert (valid.status_code, valid.content) == (200, body)
    wait_until(lambda: counts()[1] == before[1] + 2, 10, "the host to count the JSON stream")
    assert counts()[0] == before[0] + len(body)
    bad = httpx.post(stack.url + "/json/orders", content=b'{"items": ', headers={"content-type": "application/json"})
    assert bad.status_code == 400


def test_envoy_ignores_a_mode_override_its_filter_does_not_allow_and_the_host_copes(stack: Stack) -> None:
    assert stack.metrics_url is not None

    def body_bytes() -> float:
        samples = scrape(stack.metrics_url)
        return sample(samples, "extproc_body_bytes_total", route="json-ignored", direction="request", way="in")

    before = body_bytes()
    image = os.urandom(50_000)
    reply = httpx.post(stack.url + "/ignored/upload", content=image, headers={"content-type": "image/png"}, timeout=30)
    assert reply.status_code == 200 and reply.content == image
    # The host asked Envoy to skip the body; this filter does not allow overrides, so Envoy sent
    # it anyway, and the host passed it through untouched.
    wait_until(lambda: body_bytes() == before + len(image), 10, "the host to count the body Envoy sent")


def test_a_header_change_re_routes_only_when_the_route_cache_is_cleared(stack: Stack) -> None:
    # Envoy picked "marked" before ext_proc ran; its chain sets x-upstream: canary but does not
    # declare it re-routes, so Envoy keeps the route (and its upstream)...
    kept = httpx.post(stack.url + "/", content=b"x", headers={"x-mark": "1"})
    assert (kept.status_code, kept.headers["x-upstream"]) == (200, "upstream")
    # ...where the canary plugin, which declares it, gets Envoy to pick again.
    moved = httpx.post(stack.url + "/", content=b"x", headers={"x-user": "alice"})
    assert (moved.status_code, moved.headers["x-upstream"]) == (200, "canary")


def test_a_grpc_client_gets_the_plugins_grpc_status(stack: Stack) -> None:
    target = stack.url.removeprefix("http://")
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary("/auth.Orders/List", request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as refused:
            call(b"", timeout=10)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert refused.value.details() == "no API key\n"


def test_the_generated_config_gives_routes_with_their_own_filter_options_a_filter(stack: Stack) -> None:
    # What the tests above rely on, as Envoy loaded it: attributes, mode overrides and the route
    # cache action (default and canary re-route, auth does not) are filter-only options.
    dump = json.loads(stack.admin_get("/config_dump?resource=static_listeners"))
    manager = dump["configs"][0]["listener"]["filter_chains"][0]["filters"][0]["typed_config"]
    names = [f["name"] for f in manager["http_filters"]]
    assert names == [
        "envoy.filters.http.header_to_metadata",
        "envoy.filters.http.ext_proc",
        "envoy.filters.http.ext_proc.json-ignored",
        "envoy.filters.http.ext_proc.auth",
        "envoy.filters.http.ext_proc.json",
        "envoy.filters.http.ext_proc.seen",
        "envoy.filters.http.router",
    ]
