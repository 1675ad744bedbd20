"""The file_tee plugin through the in-process fake Envoy: what ends up on disk, in every body
mode, when bodies end, are cut short, are too long, or cannot be written."""

from __future__ import annotations

import asyncio
import errno
import logging
import re
import threading

import grpc
import pytest

import extproc_host_plugins.file_tee as file_tee
from extproc_host.settings import ConfigError

from . import sample_plugins
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

MiB = 1024 * 1024
CHUNKS = [b"a" * 10, b"b" * MiB, b"c" * 3, bytes(range(256)) * 100]


def write_config(tmp_path, tee: str = "", routes: str = "", directory=None) -> str:
    directory = directory or tmp_path / "tee"
    path = tmp_path / "settings.toml"
    path.write_text(
        f'[plugins.file_tee]\ndirectory = "{directory}"\n{tee}\n'
        '[routes.default]\nchain = ["file_tee"]\n'
        '[routes.tee-fail]\nchain = ["file_tee", "fail"]\n'
        "[routes.tee-fail.plugins.fail]\nafter_chunks = 1\n"
        f"{routes}"
    )
    return str(path)


def files(tmp_path) -> dict[str, bytes]:
    directory = tmp_path / "tee"
    if not directory.exists():
        return {}
    return {p.name: p.read_bytes() for p in directory.iterdir()}


async def settled(tmp_path, count: int) -> dict[str, bytes]:
    """The files once ``count`` of them exist and none is temporary. The host closes plugins
    after the gRPC status went out when a stream fails, so a failed stream's files may trail
    its status by a moment."""
    for _ in range(500):
        found = files(tmp_path)
        if len(found) >= count and not any(n.endswith(".tmp") for n in found):
            return found
        await asyncio.sleep(0.01)
    return files(tmp_path)


def exchange(route: str = "default", req_mode: int = FD, resp_mode: int = FD, chunks=CHUNKS, **kw):
    """A whole exchange: request body then response body, both ``chunks``."""
    msgs = [request_headers(route=route, request_mode=req_mode, response_mode=resp_mode, **kw)]
    msgs += [request_body(c, end=i == len(chunks) - 1) for i, c in enumerate(chunks)]
    msgs += [response_headers()]
    msgs += [response_body(c, end=i == len(chunks) - 1) for i, c in enumerate(chunks)]
    return msgs


def one_pair(found: dict[str, bytes], route: str = "default") -> tuple[bytes, bytes]:
    """The request and response copies of the only stream in ``found``."""
    assert len(found) == 2, sorted(found)
    names = sorted(found)
    match = re.fullmatch(rf"{route}-(\d+-[0-9a-f]{{12}})-request\.body", names[0])
    assert match, names
    assert names[1] == f"{route}-{match.group(1)}-response.body"
    return found[names[0]], found[names[1]]


async def test_full_duplex_multi_chunk_both_bodies(tmp_path):
    async with fake_envoy(write_config(tmp_path), sample_plugins) as envoy:
        conv = await envoy.converse(exchange())
    assert conv.code == grpc.StatusCode.OK
    body = b"".join(CHUNKS)
    assert conv.streamed("request_body")[0] == body
    assert conv.streamed("response_body")[0] == body
    assert one_pair(files(tmp_path)) == (body, body)


async def test_streamed_body_passes_unchanged_and_is_copied(tmp_path):
    async with fake_envoy(write_config(tmp_path), sample_plugins) as envoy:
        conv = await envoy.converse(exchange(req_mode=STREAMED, resp_mode=STREAMED))
    assert conv.code == grpc.StatusCode.OK
    # Bodies untouched: every chunk answered without a mutation.
    for kind in ("request_body", "response_body"):
        assert [getattr(r, kind).response.body_mutation.WhichOneof("mutation") for r in conv.of(kind)] == [None] * 4
    body = b"".join(CHUNKS)
    assert one_pair(files(tmp_path)) == (body, body)


async def test_buffered_body(tmp_path):
    body = b"".join(CHUNKS)
    async with fake_envoy(write_config(tmp_path), sample_plugins) as envoy:
        conv = await envoy.converse(exchange(req_mode=BUFFERED, resp_mode=BUFFERED, chunks=[body]))
    assert conv.code == grpc.StatusCode.OK
    assert one_pair(files(tmp_path)) == (body, body)


async def test_empty_bodies_give_empty_complete_files(tmp_path):
    async with fake_envoy(write_config(tmp_path), sample_plugins) as envoy:
        conv = await envoy.converse(exchange(chunks=[b""]))
    assert conv.code == grpc.StatusCode.OK
    assert one_pair(files(tmp_path)) == (b"", b"")


async def test_no_body_no_file(tmp_path):
    async with fake_envoy(write_config(tmp_path), sample_plugins) as envoy:
        msgs = [request_headers(route="default", end_of_stream=True), response_headers(), response_body(b"x", end=True)]
        conv = await envoy.converse(msgs)
    assert conv.code == grpc.StatusCode.OK
    found = files(tmp_path)
    assert list(found.values()) == [b"x"] and next(iter(found)).endswith("-response.body")


async def test_only_the_configured_direction_is_copied(tmp_path):
    async with fake_envoy(write_config(tmp_path, "response = false"), sample_plugins) as envoy:
        await envoy.converse(exchange())
    found = files(tmp_path)
    assert len(found) == 1 and next(iter(found)).endswith("-request.body")


async def test_streams_get_distinct_files(tmp_path):
    async with fake_envoy(write_config(tmp_path), sample_plugins) as envoy:
        for i in range(3):
            await envoy.converse(exchange(chunks=[str(i).encode()]))
    assert len(files(tmp_path)) == 6


@pytest.mark.parametrize("mode", [FD, STREAMED])
async def test_abort_mid_body_leaves_partial(tmp_path, mode):
    async with fake_envoy(write_config(tmp_path), sample_plugins) as envoy:
        # The stream ends (Envoy gave up) after two request chunks, the body never ended.
        msgs = [
            request_headers(route="default", request_mode=mode, response_mode=mode),
            request_body(b"ab"),
            request_body(b"cd"),
        ]
        await envoy.converse(msgs)
    found = files(tmp_path)
    assert len(found) == 1, sorted(found)
    name, data = next(iter(found.items()))
    assert re.fullmatch(r"default-\d+-[0-9a-f]{12}-request\.body\.partial", name)
    assert data == b"abcd"


async def test_reset_mid_response_keeps_complete_request_and_partial_response(tmp_path):
    async with fake_envoy(write_config(tmp_path), sample_plugins) as envoy:
        msgs = [
            request_headers(route="default"),
            request_body(b"req", end=True),
            response_headers(),
            response_body(b"re"),
        ]
        await envoy.converse(msgs)
    found = files(tmp_path)
    names = sorted(found)
    assert len(names) == 2
    assert names[0].endswith("-request.body") and found[names[0]] == b"req"
    assert names[1].endswith("-response.body.partial") and found[names[1]] == b"re"


async def test_cancelled_stream_leaves_partial(tmp_path):
    async with fake_envoy(write_config(tmp_path), sample_plugins) as envoy:
        msgs = [request_headers(route="default"), request_body(b"x" * 1000)]
        msgs += [request_body(b"y" * 1000) for _ in range(20)]
        await envoy.converse(msgs, cancel_after=2)
    # The host learns of the cancel asynchronously; close() runs once it has.
    found = await settled(tmp_path, 1)
    assert found and all(n.endswith("-request.body.partial") for n in found), sorted(found)


async def test_abort_with_delete_leaves_nothing(tmp_path):
    async with fake_envoy(write_config(tmp_path, 'on_abort = "delete"'), sample_plugins) as envoy:
        msgs = [request_headers(route="default"), request_body(b"ab"), request_body(b"cd")]
        await envoy.converse(msgs)
    assert files(tmp_path) == {}


async def test_other_plugin_failing_leaves_partial(tmp_path):
    async with fake_envoy(write_config(tmp_path), sample_plugins) as envoy:
        msgs = [
            request_headers(route="tee-fail"),
            request_body(b"one"),
            request_body(b"two"),
            request_body(b"three", end=True),
        ]
        conv = await envoy.converse(msgs)
    assert conv.code != grpc.StatusCode.OK
    found = await settled(tmp_path, 1)
    assert len(found) == 1, sorted(found)
    name, data = next(iter(found.items()))
    assert name.endswith("-request.body.partial")
    assert data == b"onetwo"  # file_tee saw both chunks before 'fail' raised on the second


@pytest.mark.parametrize(
    ("limit", "suffix", "expected"),
    [
        (5, ".truncated", b"aaaaa"),
        (13, "", b"a" * 10 + b"ccc"),
        (12, ".truncated", b"a" * 10 + b"cc"),
        (0, ".truncated", b""),
    ],
)
async def test_max_bytes(tmp_path, limit, suffix, expected):
    async with fake_envoy(write_config(tmp_path, f"max_bytes = {limit}\nresponse = false"), sample_plugins) as envoy:
        conv = await envoy.converse(exchange(chunks=[b"a" * 10, b"ccc"]))
    assert conv.streamed("request_body")[0] == b"a" * 10 + b"ccc"  # the body itself is never cut
    found = files(tmp_path)
    assert len(found) == 1
    name, data = next(iter(found.items()))
    assert re.fullmatch(rf"default-\d+-[0-9a-f]{{12}}-request\.body{re.escape(suffix)}", name), name
    assert data == expected


async def test_small_queue_still_copies_in_order(tmp_path):
    chunks = [bytes([i]) * 1000 for i in range(50)]
    async with fake_envoy(write_config(tmp_path, "queue_bytes = 0"), sample_plugins) as envoy:
        await envoy.converse(exchange(chunks=chunks))
    assert one_pair(files(tmp_path)) == (b"".join(chunks), b"".join(chunks))


async def test_disk_full_keeps_the_body_and_leaves_partial(tmp_path, monkeypatch, caplog):
    calls = []

    def full(fd, data):
        calls.append(len(data))
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return file_tee.os.write(fd, data)

    monkeypatch.setattr(file_tee, "_os_write", full)
    caplog.set_level(logging.ERROR, logger=file_tee.__name__)
    async with fake_envoy(write_config(tmp_path, "response = false\nqueue_bytes = 0"), sample_plugins) as envoy:
        conv = await envoy.converse(exchange(chunks=CHUNKS))
    assert conv.code == grpc.StatusCode.OK
    assert conv.streamed("request_body")[0] == b"".join(CHUNKS)
    found = files(tmp_path)
    assert len(found) == 1
    name, data = next(iter(found.items()))
    assert name.endswith("-request.body.partial")
    assert data == CHUNKS[0]
    assert len(calls) == 2  # stopped copying after the first failure
    errors = [r for r in caplog.records if "No space left" in r.getMessage()]
    assert len(errors) == 1


@pytest.mark.parametrize(
    ("tee", "key", "message"),
    [
        ('name = "{route}-{stream}-{body}"', "plugins.file_tee.name", "unknown field {body}"),
        ('name = "../{stream}-{direction}"', "plugins.file_tee.name", "must not contain '/'"),
        ('name = "x\\\\{stream}-{direction}"', "plugins.file_tee.name", "must not contain"),
        ('name = ".{stream}-{direction}"', "plugins.file_tee.name", "must not start with '.'"),
        ('name = "{route.x}-{stream}-{direction}"', "plugins.file_tee.name", "unknown field"),
        ('name = "{}-{stream}-{direction}"', "plugins.file_tee.name", "unknown field"),
        ('name = "{stream!r}-{direction}"', "plugins.file_tee.name", "no conversion"),
        ('name = "{stream:>300}-{direction}"', "plugins.file_tee.name", "no conversion or format spec"),
        ('name = "{stream-{direction}"', "plugins.file_tee.name", "not a valid template"),
        ('name = "{route}-{direction}"', "plugins.file_tee", "must contain {stream}"),
        ('name = "{route}-{stream}"', "plugins.file_tee", "must contain {direction}"),
        ('on_abort = "keep"', "plugins.file_tee.on_abort", "'partial' or 'delete'"),
        ("max_bytes = -1", "plugins.file_tee.max_bytes", "greater than or equal to 0"),
        ("colour = 1", "plugins.file_tee.colour", "unknown key"),
    ],
)
async def test_bad_settings_fail_at_start_up_naming_the_key(tmp_path, tee, key, message):
    with pytest.raises(ConfigError) as info:
        async with fake_envoy(write_config(tmp_path, tee), sample_plugins):
            pass
    text = str(info.value)
    assert f"key '{key}'" in text and message in text, text


async def test_one_direction_needs_no_direction_field(tmp_path):
    async with fake_envoy(write_config(tmp_path, 'name = "{stream}.req"\nresponse = false'), sample_plugins) as envoy:
        await envoy.converse(exchange())
    assert [n.endswith(".req") for n in files(tmp_path)] == [True]


async def test_directory_is_created(tmp_path):
    config = write_config(tmp_path, directory=tmp_path / "tee" / "a" / "b")
    async with fake_envoy(config, sample_plugins) as envoy:
        await envoy.converse(exchange())
    assert len(list((tmp_path / "tee" / "a" / "b").iterdir())) == 2


async def test_nothing_from_the_request_escapes_the_directory(tmp_path):
    evil_route = "../../../escape"
    routes = f'[routes."{evil_route}"]\nchain = ["file_tee"]\n'
    tee = 'name = "{route}{authority}{method}-{stream}-{direction}"'
    config = write_config(tmp_path, tee, routes)
    before = {p.name for p in tmp_path.iterdir()}
    async with fake_envoy(config, sample_plugins) as envoy:
        for authority, method in [
            ("../../x", "GET/.."),
            ("..", ".."),
            ("/etc/passwd", "\\..\\"),
            ("a\x00b", "%2e%2e%2f"),
        ]:
            msgs = exchange(route=evil_route, extra={":authority": authority})
            msgs[0].request_headers.headers.headers[0].raw_value = method.encode()
            conv = await envoy.converse(msgs)
            assert conv.code == grpc.StatusCode.OK
    assert {p.name for p in tmp_path.iterdir()} == before | {"tee"}
    names = sorted(files(tmp_path))
    assert len(names) == 8
    for name in names:
        assert re.fullmatch(r"[A-Za-z0-9_.-]+", name) and not name.startswith("."), name
        assert (tmp_path / "tee" / name).resolve().parent == (tmp_path / "tee").resolve()


def test_sanitise():
    assert file_tee.sanitise("../a b/ü\x00") == ".._a_b___"
    assert len(file_tee.sanitise("x" * 1000)) == file_tee.FIELD_MAX


async def test_a_stalled_disk_write_holds_back_only_its_own_stream(tmp_path, monkeypatch):
    entered, release = threading.Event(), threading.Event()

    def write(fd, data):
        if bytes(data[:4]) == b"SLOW":
            entered.set()
            release.wait(30)
        return file_tee.os.write(fd, data)

    monkeypatch.setattr(file_tee, "_os_write", write)
    async with fake_envoy(write_config(tmp_path, "queue_bytes = 0"), sample_plugins) as envoy:
        slow = asyncio.ensure_future(envoy.converse(exchange(chunks=[b"SLOW" * 10, b"rest"]), settle=False))
        try:
            assert await asyncio.to_thread(entered.wait, 30)
            # The slow stream's copy is stuck in its worker thread; another stream runs through.
            fast = await envoy.converse(exchange(chunks=[b"fast"]), settle=False)
            assert fast.code == grpc.StatusCode.OK
            assert not slow.done()
            assert sorted(n.rsplit("-", 1)[1] for n in files(tmp_path) if not n.startswith(".")) == [
                "request.body",
                "response.body",
            ]
        finally:
            release.set()
        conv = await slow
    assert conv.code == grpc.StatusCode.OK
    assert len(files(tmp_path)) == 4
