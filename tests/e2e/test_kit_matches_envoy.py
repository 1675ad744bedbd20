"""The test kit against the real Envoy: the same plugins, the same settings, once in
``PluginRunner`` and once behind Envoy with the config ``envoy-config`` generates, and what the
upstream and the client saw must be the same. So the kit cannot drift from Envoy again.

The upstream is the echo's ``.../inspect``, which answers with what it received (method, path,
headers, body); in the kit an upstream function gives the same report for the request the kit
forwarded, seen as an HTTP/1.1 upstream sees it. Compared: the method, the path, the body,
every ``x-`` header (but the ones Envoy adds for itself) and content-length / content-type /
host on the upstream's side; the status, the body, those headers and gRPC's on the client's.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from ops_helpers import wait_until

from extproc_host.stack import Stack
from extproc_host.stack.echo_common import TAG_HEADER, inspect_report
from extproc_host.testing import HttpMessage, PluginRunner, request, response

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = [ROOT / "examples" / name / "src" for name in ("extproc-apikey", "extproc-canary", "extproc-jsonguard")]

SETTINGS = """
[server]
plugin_modules = ["extproc_apikey", "extproc_canary", "extproc_jsonguard", "tests.e2e.control_plugins"]

[routes.ops]
chain = ["header-ops"]
path_prefix = "/ops"

[routes.routing]
chain = ["routing"]
path_prefix = "/routing"
mutation_rules = { allow_all_routing = true, allow_envoy = true }

[routes.strict]
chain = ["header-ops"]
path_prefix = "/strict"
mutation_rules = { disallow_is_error = true }

[routes.mock-fd]
chain = ["mock", "upper-request"]
path_prefix = "/mock-fd"

[routes.mock-streamed]
chain = ["mock", "upper-request"]
path_prefix = "/mock-streamed"
body_mode = "STREAMED"

[routes.mock-buffered]
chain = ["mock", "upper-request"]
path_prefix = "/mock-buffered"
body_mode = "BUFFERED"
buffer_limit_bytes = 1048576

[routes.digest]
chain = ["digest"]
path_prefix = "/digest"
buffer_limit_bytes = 1048576

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

[routes.canary]
chain = ["canary"]
match_headers = { "x-upstream" = "canary" }
upstream = "canary"

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

#: Headers Envoy or the HTTP client add on their own, not what a chain made.
ADDED = {"x-forwarded-proto", "x-request-id", "x-envoy-expected-rq-timeout-ms", "x-envoy-upstream-service-time"}
#: Headers compared besides x- ones.
COMPARED = {"content-length", "content-type", "host", "grpc-status", "grpc-message", "www-authenticate"}

HEADER_TO_METADATA = {
    "name": "envoy.filters.http.header_to_metadata",
    "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.header_to_metadata.v3.Config",
        "request_rules": [
            {
                "header": "x-tenant",
                "on_header_present": {"metadata_namespace": "acme.tenant", "key": "id", "type": "STRING"},
            }
        ],
    },
}


def add_earlier_filter(config: dict[str, Any]) -> None:
    manager = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    manager["http_filters"].insert(0, HEADER_TO_METADATA)


@pytest.fixture(scope="module")
def settings_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("kit-matches-envoy") / "host.toml"
    path.write_text(SETTINGS)
    return path


@pytest.fixture(scope="module")
def access_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("kit-matches-envoy-log") / "access.log"


@pytest.fixture(scope="module")
def stack(settings_file: Path, access_log: Path) -> Iterator[Stack]:
    path = os.pathsep.join([str(ROOT), *map(str, EXAMPLES)])
    with Stack(
        None,
        settings_file,
        host_env={"PYTHONPATH": path},
        upstreams=["canary"],
        envoy_config_args=["--access-log", str(access_log)],
        envoy_args=["--file-flush-interval-msec", "50"],
        envoy_edit=add_earlier_filter,
    ) as running:
        yield running


@pytest.fixture(scope="module")
def runners(settings_file: Path, monkeypatch_module: pytest.MonkeyPatch) -> Callable[[str], PluginRunner]:
    """The kit's runner of a route of the same settings (the plugins imported in process)."""
    for src in [ROOT, *EXAMPLES]:
        monkeypatch_module.syspath_prepend(str(src))
    made: dict[str, PluginRunner] = {}

    def runner(route: str) -> PluginRunner:
        if route not in made:
            made[route] = PluginRunner.from_settings(settings_file, route)
        return made[route]

    yield runner
    for each in made.values():
        each.close()


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def inspecting(tag: str) -> Callable[[HttpMessage], HttpMessage]:
    """The echo's ``.../inspect`` upstream in the kit: the report of the request it got, as an
    HTTP/1.1 upstream sees it (``host`` for ``:authority``), tagged as the Stack tags it."""

    def answer(sent: HttpMessage) -> HttpMessage:
        view = [("host", sent.header(":authority") or ""), *((k, v) for k, v in sent.headers if not k.startswith(":"))]
        report = inspect_report(sent.header(":method") or "", sent.header(":path") or "", view, sent.body)
        return response(report, headers={"content-type": "application/json", TAG_HEADER: tag})

    return answer


KIT_UPSTREAMS = {"upstream": inspecting("upstream"), "canary": inspecting("canary")}


def comparable(headers: list[tuple[str, str]]) -> dict[str, list[str]]:
    """The headers worth comparing, values in order, by name."""
    found: dict[str, list[str]] = {}
    for name, value in headers:
        name = name.lower()
        if (name.startswith("x-") and name not in ADDED) or name in COMPARED:
            found.setdefault(name, []).append(value)
    return found


def seen(status: int, headers: list[tuple[str, str]], body: bytes) -> dict[str, Any]:
    """What a client saw, and through the inspect report what the upstream saw."""
    result: dict[str, Any] = {"status": status, "headers": comparable(headers), "body": body}
    try:
        report = json.loads(body)
    except ValueError:
        return result
    if isinstance(report, dict) and "headers" in report:
        report["headers"] = comparable([tuple(pair) for pair in report["headers"]])
        result["body"] = None
        result["upstream"] = report
        # The report's own length: the client's request carried more headers than the kit's.
        if result["headers"].get("content-length") == [str(len(body))]:
            result["headers"]["content-length"] = ["the report's"]
    return result


def through_envoy(stack: Stack, method: str, path: str, headers: dict[str, str], body: bytes) -> dict[str, Any]:
    reply = httpx.request(
        method, stack.url + path, headers={"host": "example.com", **headers}, content=body, timeout=30
    )
    return seen(reply.status_code, list(reply.headers.multi_items()), reply.content)


def through_kit(
    runners: Callable[[str], PluginRunner],
    route: str,
    method: str,
    path: str,
    headers: dict[str, str],
    body: bytes,
    metadata: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    sent = request(body, method=method, path=path, headers=headers, authority="example.com")
    result = runners(route).exchange(
        sent, response=KIT_UPSTREAMS["upstream"], upstreams=KIT_UPSTREAMS, metadata=metadata
    )
    client = result.client
    return seen(client.status or 0, [(k, v) for k, v in client.headers if not k.startswith(":")], client.body)


CASES = [
    # (id, route, method, path, headers, body)
    (
        "header operations",
        "ops",
        "POST",
        "/ops/inspect",
        {"x-list": "one", "x-kept": "old", "x-replaced": "old", "x-drop": "1"},
        b"hi",
    ),
    ("path rewrite", "ops", "GET", "/ops/rewrite/inspect", {}, b""),
    ("routing headers allowed", "routing", "POST", "/routing/inspect", {"x-drop": "1"}, b"hi"),
    ("disallow_is_error", "strict", "POST", "/strict/inspect", {}, b"hi"),
    ("replace request, full duplex", "mock-fd", "POST", "/mock-fd/inspect", {"x-synthesize": "1"}, b"original body"),
    ("replace request of a GET, full duplex", "mock-fd", "GET", "/mock-fd/inspect", {"x-synthesize": "1"}, b""),
    ("mock response, full duplex", "mock-fd", "POST", "/mock-fd/inspect", {"x-mock": "1"}, b"original body"),
    (
        "replace request, streamed",
        "mock-streamed",
        "POST",
        "/mock-streamed/inspect",
        {"x-synthesize": "1"},
        b"original",
    ),
    ("mock response, streamed", "mock-streamed", "POST", "/mock-streamed/inspect", {"x-mock": "1"}, b"original"),
    ("replace request, buffered", "mock-buffered", "POST", "/mock-buffered/inspect", {"x-synthesize": "1"}, b"orig"),
    ("mock response, buffered", "mock-buffered", "POST", "/mock-buffered/inspect", {"x-mock": "1"}, b"orig"),
    ("streamed bodies, nothing replaced", "mock-streamed", "POST", "/mock-streamed/inspect", {}, b"abc" * 1000),
    ("headers from a buffered body hook", "digest", "POST", "/digest/inspect", {}, b"to be signed"),
    ("authenticated", "auth", "POST", "/auth/inspect", {"authorization": "Bearer k-alice"}, b"hi"),
    ("refused", "auth", "POST", "/auth/inspect", {"authorization": "Bearer nope"}, b"hi"),
    ("refused gRPC", "auth", "POST", "/auth/inspect", {"content-type": "application/grpc"}, b"\0\0\0\0\0"),
    ("re-routed to the canary", "default", "POST", "/inspect", {"x-user": "alice"}, b"hi"),
    ("not re-routed", "default", "POST", "/inspect", {"x-user": "bob", "x-upstream": "canary"}, b"hi"),
    ("a routing header without re-routing", "marked", "POST", "/inspect", {"x-mark": "1"}, b"hi"),
    ("body skipped", "json", "POST", "/json/inspect", {"content-type": "image/png"}, b"\x89PNG" * 100),
    ("JSON taken whole", "json", "POST", "/json/inspect", {"content-type": "application/json"}, b'{"a": [1, 2]}'),
    ("malformed JSON", "json", "POST", "/json/inspect", {"content-type": "application/json"}, b'{"a": '),
]


@pytest.mark.parametrize(
    ("route", "method", "path", "headers", "body"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_the_kit_and_envoy_forward_the_same(stack: Stack, runners, route, method, path, headers, body) -> None:
    envoy = through_envoy(stack, method, path, headers, body)
    kit = through_kit(runners, route, method, path, headers, body)
    assert kit == envoy


def test_attributes_and_forwarded_metadata_are_the_same(stack: Stack, runners) -> None:
    headers = {"x-tenant": "t-1"}
    envoy = through_envoy(stack, "POST", "/seen/inspect", headers, b"hi")
    kit = through_kit(runners, "seen", "POST", "/seen/inspect", headers, b"hi", metadata={"acme.tenant": {"id": "t-1"}})
    # The client's port is Envoy's to know: the kit's client is 127.0.0.1:40000.
    for side in (envoy, kit):
        source = side["headers"].pop("x-seen-source")
        assert source[0].startswith("127.0.0.1:")
    assert kit == envoy
    assert envoy["headers"]["x-seen-metadata"] == ['{"acme.tenant": {"id": "t-1"}}']


def test_envoy_holds_the_metadata_the_kit_says_it_holds(stack: Stack, runners, access_log: Path) -> None:
    for key, request_id in (("k-alice", "kit-1"), ("nope", "kit-2")):
        headers = {"authorization": f"Bearer {key}", "x-request-id": request_id}
        httpx.get(stack.url + "/auth/inspect", headers=headers, timeout=30)
        kit = runners("auth").exchange(request(method="GET", path="/auth/inspect", headers=headers))

        def logged(request_id: str = request_id) -> dict[str, Any] | None:
            lines = access_log.read_text().splitlines() if access_log.exists() else []
            return next((e for e in map(json.loads, lines) if e["request_id"] == request_id), None)

        entry = wait_until(logged, 10, f"the access log line of {request_id}")
        assert isinstance(entry, dict)
        assert entry["metadata"] == kit.metadata
