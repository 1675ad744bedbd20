"""Reloading the settings under load, through a real Envoy, with ``--workers 2``.

100 uploads of 1 MiB are held mid-body while the settings change (the ``chain_tag`` plugin's
tag) and the supervisor gets SIGHUP; an ordinary client keeps sending requests all along. No
request fails, every body comes back byte for byte, the held uploads finish on the chain they
started with and new requests get the new one. Settings that do not load, sent with SIGHUP,
leave the running ones in place; a reload that needs Envoy's config changed says so;
``[server] watch_config_seconds`` reloads a changed file without a signal; and a reloaded drain
delay is the one the host stops with.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from pathlib import Path

import aiohttp
import pytest
from e2e_clients import MiB, Payload
from ops_helpers import PausedUpload, wait_until

from extproc_host.stack import Stack

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
PYTHONPATH = os.pathsep.join(filter(None, [str(ROOT / "tests" / "e2e"), os.environ.get("PYTHONPATH")]))
SETTINGS = """\
[server]
plugin_modules = ["reload_plugins"]
log_level = "info"
{server}
[routes.default]
chain = ["chain_tag", "passthrough"]
body_mode = "FULL_DUPLEX_STREAMED"
[routes.default.plugins.chain_tag]
tag = "{tag}"
{more}
"""
HELD = 100


def write(path: Path, tag: str, server: str = "", more: str = "") -> None:
    path.write_text(SETTINGS.format(tag=tag, server=server, more=more))


async def post(session: aiohttp.ClientSession, url: str, body: bytes) -> tuple[int, str | None, bytes]:
    async with session.post(url, data=body) as response:
        return response.status, response.headers.get("x-chain-tag"), await response.read()


def log_lines(stack: Stack, pattern: str) -> int:
    return len(re.findall(pattern, Path(stack.logs["host"]).read_text(errors="replace")))


@pytest.fixture
def stack(tmp_path: Path):
    config = tmp_path / "host.toml"
    write(config, "v1")
    env = {"PYTHONPATH": PYTHONPATH}
    with Stack(None, config, host_args=["--workers", "2"], host_env=env, concurrency=2) as running:
        yield running


async def test_a_reload_under_load_loses_nothing_and_new_streams_get_the_new_chain(
    stack: Stack, payload, tmp_path: Path
) -> None:
    body: Payload = payload(MiB)
    config = tmp_path / "host.toml"  # the stack's settings file
    timeout = aiohttp.ClientTimeout(total=120)
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        stop = asyncio.Event()
        steady: list[tuple[int, str | None, bytes]] = []

        async def ordinary() -> None:
            while not stop.is_set():
                steady.append(await post(session, f"{stack.url}/steady", b"steady"))
                await asyncio.sleep(0.02)

        background = asyncio.ensure_future(ordinary())
        paused = [PausedUpload(body.path, pause_after=256 * 1024) for _ in range(HELD)]

        async def upload(held: PausedUpload) -> tuple[int, str | None, str]:
            import hashlib

            digest = hashlib.sha256()
            async with session.post(f"{stack.url}/held", data=held.chunks()) as response:
                async for block in response.content.iter_chunked(MiB):
                    digest.update(block)
                return response.status, response.headers.get("x-chain-tag"), digest.hexdigest()

        uploads = [asyncio.ensure_future(upload(held)) for held in paused]
        await asyncio.wait_for(asyncio.gather(*(held.paused.wait() for held in paused)), 60)

        def open_streams() -> int:
            stats = stack.envoy_stats("ext_proc.streams_")
            return stats["http.ingress.ext_proc.streams_started"] - stats.get("http.ingress.ext_proc.streams_closed", 0)

        # Every held upload's ext_proc stream is open at the host (its chain built with v1).
        await asyncio.to_thread(wait_until, lambda: open_streams() >= HELD, 60, "the held uploads' streams")
        write(config, "v2")
        os.kill(stack.pids["host"], signal.SIGHUP)
        await asyncio.to_thread(
            wait_until, lambda: log_lines(stack, r"reloaded .*host\.toml") >= 2, 30, "both workers reloaded"
        )
        fresh = [await post(session, f"{stack.url}/fresh", b"fresh") for _ in range(20)]
        for held in paused:
            held.release()
        finished = await asyncio.wait_for(asyncio.gather(*uploads), 120)
        stop.set()
        await background
    assert [(status, tag) for status, tag, _ in fresh] == [(200, "v2")] * 20
    assert all(status == 200 and tag == "v1" and digest == body.sha256 for status, tag, digest in finished), [
        (s, t) for s, t, d in finished if s != 200 or t != "v1" or d != body.sha256
    ][:5]
    assert steady and all(status == 200 and echoed == b"steady" for status, _, echoed in steady)
    assert {tag for _, tag, _ in steady} <= {"v1", "v2"} and steady[-1][1] == "v2"


def test_settings_that_do_not_load_leave_the_running_ones(stack: Stack, tmp_path: Path) -> None:
    config = tmp_path / "host.toml"
    config.write_text(config.read_text().replace('chain = ["chain_tag", "passthrough"]', 'chain = ["no_such_plugin"]'))
    os.kill(stack.pids["host"], signal.SIGHUP)
    wait_until(lambda: log_lines(stack, "reload of .* refused") >= 1, 30, "the refusal logged")
    assert "no_such_plugin" in Path(stack.logs["host"]).read_text()
    time.sleep(0.5)
    status, tag, _ = asyncio.run(_one(stack))
    assert (status, tag) == (200, "v1")
    assert log_lines(stack, "reloaded ") == 0


def test_a_reload_that_needs_a_new_envoy_config_says_so(stack: Stack, tmp_path: Path) -> None:
    config = tmp_path / "host.toml"
    write(config, "v3", more='[routes.api]\nchain = ["passthrough"]\npath_prefix = "/api"\nbody_mode = "STREAMED"\n')
    os.kill(stack.pids["host"], signal.SIGHUP)
    wait_until(lambda: log_lines(stack, "Envoy's config must change too") >= 2, 30, "the Envoy notice")
    text = Path(stack.logs["host"]).read_text()
    assert "routes added: api" in text and "--diff" in text


def test_a_changed_file_is_reloaded_when_watched(tmp_path: Path) -> None:
    config = tmp_path / "host.toml"
    write(config, "v1", server="watch_config_seconds = 0.2")
    with Stack(None, config, host_env={"PYTHONPATH": PYTHONPATH}) as stack:
        assert asyncio.run(_one(stack))[1] == "v1"
        write(config, "v2", server="watch_config_seconds = 0.2")
        wait_until(lambda: asyncio.run(_one(stack))[1] == "v2", 10, "the new tag")


def test_a_reload_changes_how_the_host_stops(tmp_path: Path) -> None:
    """drain_seconds is read when the host stops: a reload from 120 s to 0 makes SIGTERM stop
    the host at once."""
    config = tmp_path / "host.toml"
    write(config, "v1", server="drain_seconds = 120")
    with Stack(None, config, host_env={"PYTHONPATH": PYTHONPATH}, host_drain_seconds=None) as stack:
        write(config, "v2", server="drain_seconds = 0")
        os.kill(stack.pids["host"], signal.SIGHUP)
        wait_until(lambda: log_lines(stack, r"reloaded .*host\.toml") >= 1, 30, "the reload")
        assert log_lines(stack, "not applied until a restart") == 0
        os.kill(stack.pids["host"], signal.SIGTERM)
        wait_until(lambda: stack.exit_status("host") is not None, 60, "the host stopped without the old drain")
        assert stack.exit_status("host") == 0


async def _one(stack: Stack) -> tuple[int, str | None, bytes]:
    async with aiohttp.ClientSession() as session:
        return await post(session, f"{stack.url}/one", b"one")
