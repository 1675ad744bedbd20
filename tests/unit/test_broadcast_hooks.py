"""pluggy broadcast hooks: every module implementing ``stream_finished`` hears of every stream."""

from __future__ import annotations

import types

import grpc

from extproc_host import hookimpl

from . import sample_plugins
from .fake_envoy import fake_envoy, request_body, request_headers


def listener_module(name: str, seen: list) -> types.ModuleType:
    module = types.ModuleType(name)

    @hookimpl
    def stream_finished(stream, error):
        seen.append((name, stream.route, type(error).__name__ if error else None))

    module.stream_finished = stream_finished
    return module


async def test_stream_finished_reaches_every_listener(tmp_path):
    config = tmp_path / "s.toml"
    config.write_text('[routes.default]\nchain = ["passthrough"]\n[routes.failing]\nchain = ["fail"]\n')
    seen: list = []
    one, two = listener_module("one", seen), listener_module("two", seen)
    async with fake_envoy(str(config), sample_plugins, one, two) as envoy:
        ok = await envoy.converse([request_headers(route="default"), request_body(b"x", end=True)])
        failed = await envoy.converse([request_headers(route="failing"), request_body(b"x", end=True)])
    assert ok.code == grpc.StatusCode.OK and failed.code == grpc.StatusCode.INTERNAL
    assert sorted(seen) == [
        ("one", "default", None),
        ("one", "failing", "PluginError"),
        ("two", "default", None),
        ("two", "failing", "PluginError"),
    ]
