"""The example plugin in examples/extproc-shout, registered in-process and driven by the fake Envoy."""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path

import grpc
import pytest

from extproc_host.registry import build_routes, discover, make_plugin_manager
from extproc_host.settings import ConfigError, load_settings

from .fake_envoy import (
    BUFFERED,
    FD,
    STREAMED,
    fake_envoy,
    request_body,
    request_headers,
    response_body,
    response_headers,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "extproc-shout"
SHOUT_INIT = EXAMPLE / "src" / "extproc_shout" / "__init__.py"

CONFIG = """
[routes.default]
chain = ["passthrough"]

[routes.shout]
chain = ["shout"]

[routes.quiet]
chain = ["shout"]

[routes.quiet.plugins.shout]
header = "x-loud"
upper_response = false

[routes.no-header]
chain = ["shout"]

[routes.no-header.plugins.shout]
header = ""
"""

RESPONSE_CHUNKS = [b"hello, ", b"", b"w\xc3\xb6rld 123 ", b"abc" * 100_000, b"\xff\x00z"]


def load_shout():
    """The example's module, imported from its source file."""
    spec = importlib.util.spec_from_file_location("extproc_shout_example", SHOUT_INIT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def shout() -> tuple:
    """The modules to register in-process: the source copy, or none when the distribution is
    installed (the e2e test installs it for a while), since its entry point then loads it."""
    try:
        importlib.metadata.distribution("extproc-shout")
    except importlib.metadata.PackageNotFoundError:
        return (load_shout(),)
    return ()


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "settings.toml"
    path.write_text(CONFIG)
    return str(path)


@pytest.fixture
async def envoy(config, shout):
    async with fake_envoy(config, *shout) as fake:
        yield fake


def exchange(route: str, mode: int, request=(b"req",), response=RESPONSE_CHUNKS):
    msgs = [request_headers(route=route, request_mode=mode, response_mode=mode)]
    msgs += [request_body(c, end=i == len(request) - 1) for i, c in enumerate(request)]
    msgs += [response_headers()]
    msgs += [response_body(c, end=i == len(response) - 1) for i, c in enumerate(response)]
    return msgs


def set_headers(resp, kind):
    return [(h.header.key, h.header.raw_value) for h in getattr(resp, kind).response.header_mutation.set_headers]


def mutations_of(conv, kind):
    """The body mutation of every body answer of ``kind``, in order."""
    return [getattr(resp, kind).response.body_mutation for resp in conv.of(kind)]


async def test_full_duplex_upper_cases_the_response_chunk_by_chunk(envoy):
    request = [b"leave ", b"me alone"]
    conv = await envoy.converse(exchange("shout", FD, request=request))
    assert conv.code == grpc.StatusCode.OK
    # The request body is not touched.
    assert conv.streamed("request_body") == (b"leave me alone", [False, True])
    body, flags = conv.streamed("response_body")
    assert body == b"".join(RESPONSE_CHUNKS).upper()
    assert body == b"HELLO, W\xc3\xb6RLD 123 " + b"ABC" * 100_000 + b"\xff\x00Z"  # ASCII letters only
    assert flags.count(True) == 1 and flags[-1] is True
    # Chunk for chunk, same sizes out as in (the empty chunk gets no answer).
    sizes = [len(r.response_body.response.body_mutation.streamed_response.body) for r in conv.of("response_body")]
    assert sizes == [len(c) for c in RESPONSE_CHUNKS if c]
    (headers,) = conv.of("response_headers")
    assert set_headers(headers, "response_headers") == [("x-shouted-by", b"shout")]
    (req_headers,) = conv.of("request_headers")
    assert not req_headers.request_headers.response.HasField("header_mutation")


async def test_streamed_answers_each_chunk_upper_cased(envoy):
    conv = await envoy.converse(exchange("shout", STREAMED))
    assert conv.code == grpc.StatusCode.OK
    assert [m.WhichOneof("mutation") for m in mutations_of(conv, "request_body")] == [None]
    mutations = mutations_of(conv, "response_body")
    assert len(mutations) == len(RESPONSE_CHUNKS)
    forwarded = [
        m.body if m.WhichOneof("mutation") == "body" else chunk
        for m, chunk in zip(mutations, RESPONSE_CHUNKS, strict=False)
    ]
    assert forwarded == [c.upper() for c in RESPONSE_CHUNKS]
    assert not any(m.clear_body for m in mutations)
    (headers,) = conv.of("response_headers")
    assert set_headers(headers, "response_headers") == [("x-shouted-by", b"shout")]


async def test_buffered_keeps_the_size_so_content_length_is_left_alone(envoy):
    body = b"".join(RESPONSE_CHUNKS)
    conv = await envoy.converse(exchange("shout", BUFFERED, response=[body]))
    (resp,) = conv.of("response_body")
    assert resp.response_body.response.body_mutation.body == body.upper()
    assert not resp.response_body.response.header_mutation.set_headers


async def test_route_settings_override_the_defaults(envoy):
    conv = await envoy.converse(exchange("quiet", FD))
    assert conv.streamed("response_body")[0] == b"".join(RESPONSE_CHUNKS)
    (headers,) = conv.of("response_headers")
    assert set_headers(headers, "response_headers") == [("x-loud", b"shout")]

    conv = await envoy.converse(exchange("no-header", STREAMED))
    (headers,) = conv.of("response_headers")
    assert not headers.response_headers.response.HasField("header_mutation")


async def test_other_routes_do_not_shout(envoy):
    conv = await envoy.converse(exchange("default", FD))
    assert conv.streamed("response_body")[0] == b"".join(RESPONSE_CHUNKS)
    assert not conv.of("response_headers")[0].response_headers.response.HasField("header_mutation")


def test_unknown_or_wrong_settings_are_rejected_at_start_up(tmp_path, shout):
    path = tmp_path / "bad.toml"
    path.write_text('[routes.default]\nchain = ["shout"]\n\n[plugins.shout]\nupper_respnse = true\nheader = 3\n')
    pm = make_plugin_manager()
    for module in shout:
        pm.register(module)
    with pytest.raises(ConfigError) as info:
        build_routes(load_settings(path), discover(pm), str(path))
    message = str(info.value)
    assert "key 'plugins.shout.upper_respnse': unknown key" in message
    assert "key 'plugins.shout.header'" in message
