"""extproc_host.testing: the in-process driver gives what Envoy would forward, in every body mode."""

from __future__ import annotations

import asyncio
import re
from typing import ClassVar

import pytest
from hypothesis import given, settings
from pydantic import BaseModel

from extproc_host import Headers, Plugin, Reject
from extproc_host.errors import ConfigError
from extproc_host.testing import (
    ENVOY_CHUNK,
    PluginRunner,
    chunks_of,
    random_splits,
    request,
    response,
    split_at,
)
from extproc_host.testing.strategies import bodies, splits

STREAMING = ["FULL_DUPLEX_STREAMED", "STREAMED"]
ALL_BODY_MODES = ["FULL_DUPLEX_STREAMED", "STREAMED", "BUFFERED"]
CARD = re.compile(rb"\d{4}-\d{4}-\d{4}-\d{4}")
HOLD = 18  # a card number is 19 bytes: hold back enough to finish one cut in two


class CardRedact(Plugin):
    """Masks card numbers in request bodies, wherever the chunks are cut."""

    name = "card-redact"

    def __init__(self, settings: BaseModel, stream) -> None:
        super().__init__(settings, stream)
        self.held = b""

    def on_request_body(self, chunk: bytes) -> bytes:
        data = CARD.sub(b"XXXX-XXXX-XXXX-XXXX", self.held + chunk)
        self.held = data[-HOLD:]
        return data[:-HOLD]

    def on_request_body_end(self) -> bytes:
        tail, self.held = self.held, b""
        return CARD.sub(b"XXXX-XXXX-XXXX-XXXX", tail)


class NaiveRedact(Plugin):
    """The bug streaming plugins have: a match cut by a chunk boundary goes through."""

    name = "naive-redact"

    def on_request_body(self, chunk: bytes) -> bytes:
        return CARD.sub(b"XXXX-XXXX-XXXX-XXXX", chunk)


class ApiKey(Plugin):
    """Answers 401 without the right key; tags requests that have it."""

    name = "api-key"

    def on_request_headers(self, headers: Headers) -> None:
        if headers.get("x-api-key") != "k":
            raise Reject(401, "missing key", {"WWW-Authenticate": "Key"})
        headers.remove("x-api-key")
        headers.set("x-user", "alice")


class Events:
    """Records every hook call of the Tracer plugins of one test."""

    calls: ClassVar[list[str]] = []


class Tracer(Plugin):
    name = "tracer"

    def __init__(self, settings: BaseModel, stream) -> None:
        super().__init__(settings, stream)
        Events.calls.append("init")

    def on_request_headers(self, headers: Headers) -> None:
        Events.calls.append("request_headers")

    def on_request_body(self, chunk: bytes) -> bytes:
        Events.calls.append("request_body")
        return chunk

    def on_request_body_end(self) -> bytes:
        Events.calls.append("request_body_end")
        return b""

    def on_response_headers(self, headers: Headers) -> None:
        Events.calls.append("response_headers")

    def on_response_body(self, chunk: bytes) -> bytes:
        Events.calls.append("response_body")
        return chunk

    def on_response_body_end(self) -> bytes:
        Events.calls.append("response_body_end")
        return b""

    def close(self, error: BaseException | None) -> None:
        Events.calls.append(f"close:{type(error).__name__ if error else None}")


class Shrink(Plugin):
    """Drops every other byte of response bodies (changes the size)."""

    name = "shrink"

    def on_response_body(self, chunk: bytes) -> bytes:
        return chunk[::2]


class Boom(Plugin):
    name = "boom"

    def on_request_body(self, chunk: bytes) -> bytes:
        raise RuntimeError("boom")


class TrailerTag(Plugin):
    name = "trailer-tag"

    def on_request_trailers(self, trailers: Headers) -> None:
        trailers.set("x-checked", "yes")


class Prefix(Plugin):
    name = "prefix"

    class Settings(BaseModel):
        text: str = ">"

    def on_response_body(self, chunk: bytes) -> bytes:
        return chunk

    def on_response_body_end(self) -> bytes:
        return self.settings.text.encode()


@pytest.fixture(autouse=True)
def fresh_events() -> None:
    Events.calls = []


CARD_BODY = b"pay 1234-5678-9012-3456 now, and 1111-2222-3333-4444 later"
MASKED = b"pay XXXX-XXXX-XXXX-XXXX now, and XXXX-XXXX-XXXX-XXXX later"


@pytest.mark.parametrize("mode", ALL_BODY_MODES)
def test_a_boundary_safe_redactor_masks_wherever_the_body_is_cut(plugin_runner, mode: str) -> None:
    runner = plugin_runner(CardRedact, mode=mode)
    split = random_splits(seed=3, max_chunks=30, empty_chunks=True)
    for _ in range(100):
        result = runner.exchange(request(CARD_BODY), splits=split)
        assert result.upstream is not None
        assert result.upstream.body == MASKED, result.request_chunks
        assert result.client.body == MASKED  # the echo upstream sends it back


def test_random_splits_find_the_boundary_bug_and_report_the_cut(plugin_runner) -> None:
    runner = plugin_runner(NaiveRedact, mode="FULL_DUPLEX_STREAMED")
    assert runner.exchange(request(CARD_BODY)).upstream.body == MASKED  # one chunk: looks fine
    cut = runner.exchange(request(CARD_BODY), splits=split_at(10))
    assert cut.upstream.body != MASKED
    assert cut.request_chunks == [10, len(CARD_BODY) - 10]


@settings(max_examples=60, deadline=None)
@given(split=splits(max_offset=len(CARD_BODY)), prefix=bodies(max_size=40))
def test_hypothesis_strategy_drives_the_runner(split, prefix: bytes) -> None:
    body = prefix.replace(b"-", b"") + b" " + CARD_BODY
    with PluginRunner(CardRedact, mode="STREAMED") as runner:
        result = runner.exchange(request(body), splits=split)
    assert result.upstream.body == CARD.sub(b"XXXX-XXXX-XXXX-XXXX", body)


def test_split_helpers() -> None:
    assert split_at(3, 10)(b"hello, world!") == [b"hel", b"lo, wor", b"ld!"]
    assert split_at(3, 3)(b"hello") == [b"hel", b"", b"lo"]
    assert split_at(0, 99)(b"abc") == [b"abc"]
    assert repr(split_at(10, 3)) == "split_at(3, 10)"
    assert chunks_of(2)(b"abcde") == [b"ab", b"cd", b"e"]
    one, two = random_splits(seed=5), random_splits(seed=5)
    body = bytes(range(200))
    cuts = [one(body) for _ in range(5)]
    assert cuts == [two(body) for _ in range(5)]  # reproducible from the seed
    assert all(b"".join(c) == body for c in cuts)
    assert len({len(c) for c in cuts}) > 1  # and not always the same cut


def test_large_bodies_go_in_envoys_chunks(plugin_runner) -> None:
    runner = plugin_runner(Tracer, mode="FULL_DUPLEX_STREAMED")
    body = b"x" * (ENVOY_CHUNK * 2 + 5)
    result = runner.exchange(request(body))
    assert result.request_chunks == [ENVOY_CHUNK, ENVOY_CHUNK, 5]
    assert result.upstream.body == body


def test_reject_is_a_local_reply_and_close_gets_it(plugin_runner) -> None:
    runner = plugin_runner(ApiKey, Tracer)
    result = runner.exchange(request(b"hi"))
    assert result.rejected
    assert result.upstream is None
    assert result.client.status == 401
    assert result.client.body == b"missing key"
    assert result.client.header("www-authenticate") == "Key"
    # The later plugin was built and is closed with the Reject, though no hook of it ran.
    assert Events.calls == ["init", "close:Reject"]
    assert isinstance(result.close_error, Reject)

    allowed = runner.exchange(request(b"hi", headers={"X-Api-Key": "k"}))
    assert allowed.local_reply is None
    assert allowed.upstream.header("x-user") == "alice"
    assert allowed.upstream.header("x-api-key") is None
    assert allowed.client.body == b"hi"


@pytest.mark.parametrize("mode", ALL_BODY_MODES)
def test_hook_order_with_and_without_bodies(plugin_runner, mode: str) -> None:
    runner = plugin_runner(Tracer, mode=mode)
    runner.exchange(request(b"abc"))
    assert Events.calls == [
        "init",
        "request_headers",
        "request_body",
        "request_body_end",
        "response_headers",
        "response_body",
        "response_body_end",
        "close:None",
    ]
    Events.calls = []
    runner.exchange(request(method="GET"), response(status=204))
    # No body: no body hooks, and no *_body_end either.
    assert Events.calls == ["init", "request_headers", "response_headers", "close:None"]


def test_content_length_per_mode(plugin_runner) -> None:
    body = b"0123456789"
    streamed = plugin_runner(Shrink, mode="STREAMED").exchange(request(body))
    assert streamed.client.body == b"02468"
    assert streamed.client.header("content-length") is None  # Envoy drops it in streamed modes
    buffered = plugin_runner(Shrink, mode="BUFFERED").exchange(request(body))
    assert buffered.client.body == b"02468"
    assert buffered.client.header("content-length") == "5"  # the host fixes it in BUFFERED
    assert buffered.upstream.header("content-length") == "10"


def test_none_mode_passes_bodies_untouched(plugin_runner) -> None:
    result = plugin_runner(ApiKey, mode="NONE").exchange(request(b"abc", headers={"x-api-key": "k"}))
    assert (result.request_mode, result.response_mode) == ("NONE", "NONE")
    assert result.upstream.body == b"abc"
    assert result.upstream.header("content-length") == "3"  # nothing streamed: the length stays
    assert result.upstream.header("x-user") == "alice"


def test_a_mode_the_chain_cannot_work_in_is_refused_like_the_host_refuses_it() -> None:
    with pytest.raises(ConfigError, match="needs the request body"):
        PluginRunner(CardRedact, request_mode="NONE")


def test_the_default_mode_is_what_the_generated_envoy_config_asks_for(plugin_runner) -> None:
    result = plugin_runner(Shrink).exchange(request(b"abcd"))
    assert (result.request_mode, result.response_mode) == ("NONE", "FULL_DUPLEX_STREAMED")
    assert result.upstream.body == b"abcd"
    assert result.client.body == b"ac"


def test_buffer_limit_applies_to_responses_too(plugin_runner) -> None:
    runner = plugin_runner(Tracer, mode="BUFFERED", buffer_limit_bytes=8)
    too_big = runner.exchange(request(b"x" * 9))
    assert too_big.local_reply is not None and too_big.local_reply.by == "envoy"
    assert too_big.client.status == 413
    small_request = runner.exchange(request(b"x"), response(b"y" * 9))
    assert small_request.client.status == 500
    assert small_request.upstream.body == b"x"


@pytest.mark.parametrize("mode", STREAMING)
def test_trailers_are_changed_and_end_the_body(plugin_runner, mode: str) -> None:
    runner = plugin_runner(TrailerTag, Tracer, mode=mode)
    result = runner.exchange(request(b"abc", trailers={"x-sum": "1"}))
    assert result.upstream.trailers == [("x-sum", "1"), ("x-checked", "yes")]
    assert result.upstream.body == b"abc"
    assert "request_body_end" in Events.calls


def test_flushing_after_trailers_needs_full_duplex(plugin_runner) -> None:
    fd = plugin_runner(Prefix, mode="FULL_DUPLEX_STREAMED").exchange(
        request(b"a"), response(b"abc", trailers={"x-t": "1"})
    )
    assert fd.client.body == b"abc>"
    streamed = plugin_runner(Prefix, mode="STREAMED").exchange(request(b"a"), response(b"abc", trailers={"x-t": "1"}))
    assert streamed.failed is not None and "FULL_DUPLEX_STREAMED" in streamed.failed
    assert streamed.client.status == 500


def test_plugin_settings_are_validated(plugin_runner) -> None:
    result = plugin_runner(Prefix, settings={"prefix": {"text": "!"}}).exchange(request(b"a"))
    assert result.client.body == b"a!"
    with pytest.raises(ConfigError, match=r"plugins\.prefix\.text"):
        PluginRunner(Prefix, settings={"prefix": {"text": 3}})


def test_fail_closed_and_fail_open(plugin_runner) -> None:
    closed = plugin_runner(Boom, Tracer, mode="STREAMED").exchange(request(b"abc"))
    assert closed.failed is not None and "boom" in closed.failed
    assert closed.client.status == 500
    assert closed.upstream is None
    assert Events.calls[-1] == "close:PluginError"
    opened = plugin_runner(Boom, mode="STREAMED", failure_policy="fail_open").exchange(request(b"abc"))
    assert opened.failed is None
    assert opened.upstream.body == b"abc"


def test_installed_plugins_by_name_and_settings_files(tmp_path) -> None:
    assert PluginRunner("passthrough").exchange(request(b"abc")).client.body == b"abc"
    path = tmp_path / "host.toml"
    path.write_text(
        '[routes.default]\nchain = ["passthrough"]\n'
        '[routes.big]\nchain = ["passthrough"]\npath_prefix = "/big"\nbody_mode = "BUFFERED"\n'
    )
    with pytest.raises(ConfigError, match="buffer_limit_bytes"):
        PluginRunner.from_settings(path, route="big")
    path.write_text(path.read_text() + "buffer_limit_bytes = 4\n")
    runner = PluginRunner.from_settings(path, route="big")
    assert runner.exchange(request(b"abcde", path="/big")).client.status == 413
    with pytest.raises(ConfigError, match="no route named 'nope'"):
        PluginRunner.from_settings(path, route="nope")


async def test_aexchange_runs_on_the_callers_loop() -> None:
    runner = PluginRunner(CardRedact, mode="FULL_DUPLEX_STREAMED")
    result = await runner.aexchange(request(CARD_BODY), splits=split_at(7))
    assert result.upstream.body == MASKED
    with pytest.raises(RuntimeError, match="aexchange"):
        runner.exchange(request(b"x"))


def test_a_response_built_from_the_upstream_request(plugin_runner) -> None:
    def upstream(received):
        return response(b"saw " + received.body, status=201, headers={"Content-Type": "text/plain"})

    result = plugin_runner(CardRedact).exchange(request(CARD_BODY), upstream)
    assert result.client.status == 201
    assert result.client.body == b"saw " + MASKED
    assert result.client.header("content-type") == "text/plain"


def test_non_plugins_are_refused() -> None:
    with pytest.raises(TypeError, match="neither a Plugin subclass"):
        PluginRunner(object)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one plugin"):
        PluginRunner()


def test_the_plugin_runner_fixture_closes_its_loops(plugin_runner) -> None:
    runner = plugin_runner("passthrough")
    runner.exchange(request(b"a"))
    assert runner._loop is not None and not runner._loop.is_closed()
    runner.close()
    assert runner._loop.is_closed()
    asyncio.run(asyncio.sleep(0))  # the caller's own loops are unaffected


def test_an_observe_only_route_sends_in_observability_mode_and_forwards_bodies_untouched(tmp_path) -> None:
    with PluginRunner("file_tee", settings={"file_tee": {"directory": str(tmp_path)}}) as runner:
        assert runner.modes.observe
        result = runner.exchange(request(b"copy me"), splits=split_at(3))
    assert result.upstream.body == b"copy me"
    assert result.client.body == b"copy me"
    assert result.responses == []  # Envoy awaits no answer in observability mode
    copies = sorted(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
    assert b"copy me" in copies
