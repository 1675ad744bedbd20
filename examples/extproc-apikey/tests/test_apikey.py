"""The apikey plugin's own tests, with extproc-host's kit: in process (what Envoy would apply,
the metadata Envoy would hold), and behind a real Envoy whose access log prints the verdict."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import extproc_apikey
import httpx
from extproc_apikey import ApiKey

from extproc_host.testing import request

KEYS = {"apikey": {"keys": {"k-alice": "alice"}}}


def test_a_known_key_passes_as_its_user_and_tells_envoy(plugin_runner) -> None:
    result = plugin_runner(ApiKey, settings=KEYS).exchange(request(b"hi", headers={"authorization": "Bearer k-alice"}))
    assert result.upstream.header("x-user") == "alice"
    assert result.upstream.header("authorization") is None  # the upstream never sees the key
    assert result.metadata == {"extproc.auth": {"authenticated": True, "user": "alice"}}


def test_an_unknown_key_is_refused_and_the_refusal_is_logged(plugin_runner) -> None:
    runner = plugin_runner(ApiKey, settings=KEYS)
    result = runner.exchange(request(b"hi", headers={"authorization": "Bearer nope"}))
    assert result.upstream is None
    assert result.client.status == 401
    assert result.client.header("www-authenticate") == "Bearer"
    assert result.metadata == {"extproc.auth": {"authenticated": False, "reason": "unknown API key"}}
    assert runner.exchange(request(b"hi")).metadata["extproc.auth"]["reason"] == "no API key"


def test_grpc_clients_get_unauthenticated(plugin_runner) -> None:
    grpc = request(b"\0\0\0\0\0", headers={"content-type": "application/grpc"})
    result = plugin_runner(ApiKey, settings=KEYS).exchange(grpc)
    assert result.client.status == 200
    assert result.client.header("grpc-status") == "16"


def test_a_key_in_its_own_header(plugin_runner) -> None:
    settings = {"apikey": {"keys": {"k-bob": "bob"}, "header": "x-api-key"}}
    result = plugin_runner(ApiKey, settings=settings).exchange(request(headers={"x-api-key": "k-bob"}))
    assert result.upstream.header("x-user") == "bob"
    assert result.upstream.header("x-api-key") is None


def test_behind_a_real_envoy_the_access_log_prints_the_verdict(envoy_stack, tmp_path: Path) -> None:
    settings = (
        '[server]\nplugin_modules = ["extproc_apikey"]\n'
        '[routes.default]\nchain = ["apikey"]\n'
        '[plugins.apikey]\nkeys = { "k-alice" = "alice" }\n'
    )
    src = str(Path(extproc_apikey.__file__).resolve().parents[1])
    path = os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))
    log = tmp_path / "access.log"
    stack = envoy_stack(
        settings,
        host_env={"PYTHONPATH": path},
        envoy_config_args=["--access-log", str(log)],
        envoy_args=["--file-flush-interval-msec", "50"],
    )
    ok = httpx.get(stack.url + "/orders", headers={"authorization": "Bearer k-alice", "x-request-id": "one"})
    refused = httpx.get(stack.url + "/orders", headers={"x-request-id": "two"})
    assert (ok.status_code, refused.status_code) == (200, 401)
    lines: dict[str, dict] = {}
    deadline = time.monotonic() + 10
    while len(lines) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
        if log.exists():
            lines = {entry["request_id"]: entry for entry in map(json.loads, log.read_text().splitlines())}
    assert lines["one"]["metadata"] == {"extproc.auth": {"authenticated": True, "user": "alice"}}
    assert lines["two"]["metadata"] == {"extproc.auth": {"authenticated": False, "reason": "no API key"}}
    assert lines["two"]["response_code_details"] == "apikey:_no_API_key"
