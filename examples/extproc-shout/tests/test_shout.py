"""The shout plugin's own tests, written with extproc-host's kit (extproc_host.testing): in
process in every body mode, and behind a real Envoy (skipped when no Envoy is installed)."""

from __future__ import annotations

import os
from pathlib import Path

import extproc_shout
import httpx
import pytest
from extproc_shout import Shout

from extproc_host.testing import random_splits, request, response

BODY = b"Hello, plugin authors! 123 \xc3\xa9t\xc3\xa9"


@pytest.mark.parametrize("mode", ["FULL_DUPLEX_STREAMED", "STREAMED", "BUFFERED"])
def test_upper_cases_responses_and_marks_them(plugin_runner, mode: str) -> None:
    runner = plugin_runner(Shout, mode=mode)
    result = runner.exchange(request(BODY), splits=random_splits(seed=1, max_chunks=10))
    assert result.upstream.body == BODY  # requests are left alone
    assert result.client.body == BODY.upper()  # ASCII letters only: é stays as it is
    assert result.client.header("x-shouted-by") == "shout"


def test_settings(plugin_runner) -> None:
    runner = plugin_runner(Shout, settings={"shout": {"header": "", "upper_response": False}})
    result = runner.exchange(request(b"quiet"))
    assert result.client.body == b"quiet"
    assert result.client.header("x-shouted-by") is None


def test_response_without_body(plugin_runner) -> None:
    result = plugin_runner(Shout).exchange(request(method="GET"), response(status=204))
    assert result.client.status == 204
    assert result.client.body == b""
    assert result.client.header("x-shouted-by") == "shout"


def test_behind_a_real_envoy(envoy_stack) -> None:
    # Loaded through plugin_modules, so this runs from a checkout without installing the example.
    settings = '[server]\nplugin_modules = ["extproc_shout"]\n[routes.default]\nchain = ["shout"]\n'
    src = str(Path(extproc_shout.__file__).resolve().parents[1])
    path = os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))
    stack = envoy_stack(settings, host_env={"PYTHONPATH": path})
    reply = httpx.post(stack.url + "/", content=BODY * 1000, timeout=30)
    assert reply.status_code == 200
    assert reply.content == BODY.upper() * 1000
    assert reply.headers["x-shouted-by"] == "shout"
