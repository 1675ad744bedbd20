"""The jsonguard plugin's own tests, with extproc-host's kit: in process (which bodies Envoy
would send the host), and behind a real Envoy."""

from __future__ import annotations

import json
import os
from pathlib import Path

import extproc_jsonguard
import httpx
import pytest
from extproc_jsonguard import JsonGuard, is_json

from extproc_host.testing import request

JSON = {"content-type": "application/json"}


LIMIT = 1024 * 1024


@pytest.mark.parametrize("override", [True, False])
def test_valid_json_goes_on_unchanged(plugin_runner, override: bool) -> None:
    body = json.dumps({"items": list(range(500))}).encode()
    runner = plugin_runner(JsonGuard, allow_mode_override=override, buffer_limit_bytes=LIMIT)
    result = runner.exchange(request(body, headers=JSON))
    assert result.request_mode == "BUFFERED"
    assert result.upstream.body == body


def test_malformed_json_is_refused_before_the_upstream(plugin_runner) -> None:
    runner = plugin_runner(JsonGuard, allow_mode_override=True, buffer_limit_bytes=LIMIT)
    result = runner.exchange(request(b'{"a": ', headers=JSON))
    assert result.upstream is None
    assert result.client.status == 400
    assert json.loads(result.client.body)["error"].startswith("malformed JSON")


def test_envoy_refuses_json_over_the_buffer_limit(plugin_runner) -> None:
    runner = plugin_runner(JsonGuard, buffer_limit_bytes=10)
    too_large = runner.exchange(request(b"[" + b"1," * 20 + b"1]", headers=JSON))
    assert (too_large.client.status, too_large.local_reply.by) == (413, "envoy")


def test_other_bodies_never_reach_the_host_where_the_route_allows_it(plugin_runner) -> None:
    upload = request(b"\x89PNG not json", headers={"content-type": "image/png"})
    allowed = plugin_runner(JsonGuard, allow_mode_override=True, buffer_limit_bytes=LIMIT).exchange(upload)
    assert allowed.upstream.body == upload.body
    assert allowed.request_chunks == []  # Envoy was told not to send it
    streamed = plugin_runner(JsonGuard, buffer_limit_bytes=LIMIT).exchange(upload)
    assert streamed.upstream.body == upload.body
    assert streamed.request_chunks == [len(upload.body)]  # sent, and passed through untouched


def test_content_types() -> None:
    assert is_json("application/json; charset=utf-8")
    assert is_json("application/problem+json")
    assert not is_json("text/json-ish")
    assert not is_json(None)


def test_behind_a_real_envoy(envoy_stack) -> None:
    settings = (
        '[server]\nplugin_modules = ["extproc_jsonguard"]\n'
        '[routes.default]\nchain = ["jsonguard"]\nallow_mode_override = true\nbuffer_limit_bytes = 1048576\n'
    )
    src = str(Path(extproc_jsonguard.__file__).resolve().parents[1])
    path = os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))
    stack = envoy_stack(settings, host_env={"PYTHONPATH": path})
    good = httpx.post(stack.url + "/", content=b'{"ok": true}', headers=JSON)
    bad = httpx.post(stack.url + "/", content=b'{"ok": ', headers=JSON)
    other = httpx.post(stack.url + "/", content=b"{not json at all", headers={"content-type": "text/plain"})
    assert (good.status_code, good.content) == (200, b'{"ok": true}')
    assert bad.status_code == 400
    assert (other.status_code, other.content) == (200, b"{not json at all")
