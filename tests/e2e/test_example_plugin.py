"""The example third-party plugin (examples/extproc-shout), installed with pip like any user's
plugin and run by the host behind a real Envoy.

The distribution is installed into this environment for the module's tests and uninstalled
afterwards, so the environment is left as it was found.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from e2e_clients import ROUTE_PATHS, Echoed, KiB, MiB, Payload, h1_request, h2_request

from extproc_host.stack import Stack, extproc_host_command

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "extproc-shout"
DIST = "extproc-shout"

HOST_CONFIG = """
[routes.full-duplex-streamed]
chain = ["shout"]

[routes.streamed]
chain = ["shout"]

[routes.buffered]
chain = ["shout"]

[routes.default]
chain = ["passthrough"]
"""

SHOUT_ROUTES = ["full-duplex-streamed", "streamed", "buffered"]


def _pip(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, env=env, timeout=600)


def _installed() -> bool:
    try:
        importlib.metadata.distribution(DIST)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.fixture(scope="module")
def shout_installed(tmp_path_factory):
    """pip-installs the example (from a copy, so the build leaves nothing in the source tree)."""
    was_installed = _installed()
    source = tmp_path_factory.mktemp("example") / "extproc-shout"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    # --no-deps: extproc-host, its one dependency, is this environment's editable install.
    result = _pip("install", "--no-deps", str(source))
    assert result.returncode == 0, f"pip install failed:\n{result.stdout}\n{result.stderr}"
    try:
        yield
    finally:
        if not was_installed:
            result = _pip("uninstall", "-y", DIST)
            assert result.returncode == 0, f"pip uninstall failed:\n{result.stdout}\n{result.stderr}"
            assert not _installed()


@pytest.fixture(scope="module")
def shout_stack(shout_installed, tmp_path_factory):
    """Envoy + echo + a host (started after the install) whose body-mode routes run shout."""
    config = tmp_path_factory.mktemp("shout-config") / "host.toml"
    config.write_text(HOST_CONFIG)
    with Stack("envoy/full_duplex.yaml", host_config=config) as running:
        yield running


def test_plugins_command_lists_shout_with_its_distribution(shout_installed):
    result = subprocess.run(
        [*extproc_host_command(), "plugins"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},  # one table row per line
    )
    assert result.returncode == 0, result.stderr
    (row,) = [line for line in result.stdout.splitlines() if " shout " in line]
    cells = [cell.strip() for cell in row.strip("│| \n").split("│")]
    assert cells[:3] == ["shout", "0.1.0", DIST]
    assert cells[3] == "on_response_headers, on_response_body"
    assert any(" passthrough " in line for line in result.stdout.splitlines())


def _upper_sha256(data: bytes) -> str:
    return hashlib.sha256(data.upper()).hexdigest()


async def _h1_with_content_length(url: str, body: Payload) -> Echoed:
    # Not h1_request(chunked=False): aiohttp 3.14 uploading a file object stalls now and then
    # while the echo streams the response back (seen against the echo alone, without Envoy).
    async with httpx.AsyncClient(timeout=120) as client:
        response = await client.post(url, content=body.read())
    headers = {k.lower(): v for k, v in response.headers.items()}
    return Echoed(response.status_code, headers, len(response.content), hashlib.sha256(response.content).hexdigest())


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("size", [0, 10, 300 * KiB, 3 * MiB + 17])
@pytest.mark.parametrize("route", SHOUT_ROUTES)
async def test_h1_response_is_upper_cased_in_every_body_mode(shout_stack, payload, route, size, chunked):
    body = payload(size)
    url = shout_stack.url + ROUTE_PATHS[route]
    echoed = await (h1_request(url, body=body, chunked=True) if chunked else _h1_with_content_length(url, body))
    assert echoed.status == 200
    assert echoed.headers.get("x-shouted-by") == "shout"
    assert echoed.size == size
    assert echoed.sha256 == _upper_sha256(body.read())


@pytest.mark.parametrize("size", [10, 3 * MiB + 17])
@pytest.mark.parametrize("route", SHOUT_ROUTES)
async def test_h2c_response_is_upper_cased_in_every_body_mode(shout_stack, payload, route, size):
    body = payload(size)
    echoed = await h2_request(shout_stack.url + ROUTE_PATHS[route], body=body, chunked=True)
    assert echoed.status == 200
    assert echoed.headers.get("x-shouted-by") == "shout"
    assert echoed.sha256 == _upper_sha256(body.read())


async def test_routes_without_shout_are_left_alone(shout_stack, payload):
    body = payload(300 * KiB)
    echoed = await h1_request(shout_stack.url + ROUTE_PATHS["default"], body=body, chunked=True)
    assert echoed.status == 200
    assert "x-shouted-by" not in echoed.headers
    assert echoed.sha256 == body.sha256
