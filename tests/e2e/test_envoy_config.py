"""``extproc-host envoy-config`` against a real Envoy: every settings file in config/ renders
to a bootstrap ``envoy --mode validate`` accepts, the files in envoy/ are the command's current
output, and a route whose chain touches only response bodies gets only those from Envoy."""

from __future__ import annotations

import hashlib
import os
import shlex
from pathlib import Path

import aiohttp
import pytest

from extproc_host.cli import main
from extproc_host.stack import Stack, validate_envoy_config

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("no_extproc_env")]

ROOT = Path(__file__).resolve().parents[2]
SETTINGS_FILES = sorted((ROOT / "config").glob("*.toml"))
ENVOY_FILES = [*sorted((ROOT / "envoy").glob("*.yaml")), ROOT / "deploy" / "envoy.yaml"]
REGENERATE = "#   extproc-host envoy-config "


def validate(path: Path) -> None:
    assert "OK" in validate_envoy_config(path)


@pytest.mark.parametrize("settings", SETTINGS_FILES, ids=[p.name for p in SETTINGS_FILES])
def test_every_settings_file_renders_a_config_envoy_accepts(settings: Path, tmp_path: Path) -> None:
    out = tmp_path / "envoy.yaml"
    assert main(["envoy-config", "--config", str(settings), "-o", str(out)]) == 0
    validate(out)


def test_options_render_a_config_envoy_accepts(tmp_path: Path) -> None:
    """Hostnames (STRICT_DNS), a unix socket for the host, other ports, IPv6 listener."""
    out = tmp_path / "envoy.yaml"
    options = [
        "--listen",
        "[::]:10080",
        "--admin-port",
        "10081",
        "--upstream",
        "localhost:8081",
        "--host-address",
        f"unix:{tmp_path}/host.sock",
        "--message-timeout",
        "0.5",
    ]
    assert main(["envoy-config", "--config", str(ROOT / "config/full_duplex.toml"), "-o", str(out), *options]) == 0
    validate(out)
    assert (
        main(["envoy-config", "--config", str(ROOT / "config/full_duplex.toml"), "-o", str(out), "--no-ext-proc"]) == 0
    )
    validate(out)


def regenerate_command(path: Path) -> list[str]:
    """The command a generated file's header says reproduces it (arguments after envoy-config)."""
    for line in path.read_text().splitlines():
        if line.startswith(REGENERATE):
            return shlex.split(line.removeprefix(REGENERATE))
    raise AssertionError(f"{path.name} has no '{REGENERATE.strip()} ...' header: it is not generated")


@pytest.mark.parametrize("envoy_file", ENVOY_FILES, ids=[str(p.relative_to(ROOT)) for p in ENVOY_FILES])
def test_envoy_files_are_the_commands_current_output(
    envoy_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fails when config/ or the generator changed and `make envoy-configs` was not run."""
    monkeypatch.chdir(ROOT)  # the headers name settings files relative to the repository
    out = tmp_path / envoy_file.name
    assert main(["envoy-config", *regenerate_command(envoy_file), "-o", str(out)]) == 0
    assert out.read_text() == envoy_file.read_text(), f"{envoy_file} is stale: run make envoy-configs"


RESPONSE_ONLY_SETTINGS = """
[server]
plugin_modules = ["tests.unit.needs_plugins"]

[routes.response-only]
chain = ["response_only"]
path_prefix = "/response-only"

# The same chain with everything sent, for comparison.
[routes.everything]
chain = ["response_only"]
path_prefix = "/everything"
send = ["request_body", "request_trailers", "response_headers", "response_body", "response_trailers"]

# passthrough needs nothing: ext_proc is disabled on this route.
[routes.default]
chain = ["passthrough"]
"""


async def post(url: str, body: bytes) -> bytes:
    async with aiohttp.ClientSession() as session, session.post(url, data=body) as resp:
        assert resp.status == 200
        return await resp.read()


def test_response_only_chain_gets_only_response_bodies(tmp_path: Path) -> None:
    import asyncio

    settings = tmp_path / "settings.toml"
    settings.write_text(RESPONSE_ONLY_SETTINGS)
    envoy_yaml = tmp_path / "envoy.yaml"
    assert main(["envoy-config", "--config", str(settings), "-o", str(envoy_yaml)]) == 0
    body = os.urandom(200 * 1024)
    digest = hashlib.sha256(body).hexdigest()
    with Stack(envoy_yaml, settings, host_env={"PYTHONPATH": str(ROOT)}) as stack:

        def exchange(path: str) -> tuple[str, str]:
            got = asyncio.run(post(stack.url + path, body))
            echoed, sep, summary = got.rpartition(b"|")
            assert sep, got[-200:]
            return hashlib.sha256(echoed).hexdigest(), summary.decode()

        assert exchange("/response-only") == (
            digest,
            "request=NONE,response=FULL_DUPLEX_STREAMED,response_headers=False",
        )
        assert exchange("/everything") == (
            digest,
            "request=FULL_DUPLEX_STREAMED,response=FULL_DUPLEX_STREAMED,response_headers=True",
        )
        started = stack.envoy_stats(r"ext_proc\.streams_started")
        got = asyncio.run(post(stack.url + "/other", body))
        assert hashlib.sha256(got).hexdigest() == digest
        assert stack.envoy_stats(r"ext_proc\.streams_started") == started  # default: no ext_proc stream
        assert sum(started.values()) == 2
