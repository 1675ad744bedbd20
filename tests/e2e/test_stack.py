"""The Envoy configs in envoy/, the echo upstream and the stack runner (extproc_host.stack),
checked on their own: without extproc-host where possible, with a minimal ext_proc server
(minimal_processor.py) where Envoy needs one."""

from __future__ import annotations

import asyncio
import hashlib
import sys
from pathlib import Path

import aiohttp
import psutil
import pytest
import yaml
from e2e_clients import ROUTE_PATHS, MiB, h1_request

from extproc_host.stack import PROJECT_ROOT, Stack, StackError, rewrite_envoy_config, validate_envoy_config
from extproc_host.stack.echo_common import pattern

pytestmark = pytest.mark.e2e

ENVOY_CONFIGS = sorted((PROJECT_ROOT / "envoy").glob("*.yaml"))
MINIMAL_PROCESSOR = [sys.executable, str(Path(__file__).with_name("minimal_processor.py")), "--listen", "127.0.0.1:0"]


def _gone(pids) -> bool:
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                return False
        except psutil.NoSuchProcess:
            pass
    return True


@pytest.mark.parametrize("config", ENVOY_CONFIGS, ids=lambda p: p.name)
def test_envoy_config_validates(config: Path) -> None:
    assert "OK" in validate_envoy_config(config)


def test_expected_envoy_configs_exist() -> None:
    assert {p.name for p in ENVOY_CONFIGS} >= {"full_duplex.yaml", "streamed.yaml", "direct.yaml"}


def test_rewrite_moves_ports_and_points_clusters() -> None:
    template = yaml.safe_load((PROJECT_ROOT / "envoy/full_duplex.yaml").read_text())
    config = rewrite_envoy_config(template, extproc_port=1111, upstream_port=2222)
    assert config["admin"]["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 0}
    for listener in config["static_resources"]["listeners"]:
        assert listener["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 0}
    ports = {}
    for cluster in config["static_resources"]["clusters"]:
        (endpoint,) = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
        ports[cluster["name"]] = endpoint["endpoint"]["address"]["socket_address"]["port_value"]
    assert ports == {"extproc": 1111, "upstream": 2222}
    # The template itself is left alone.
    assert template["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"] == 18080


def test_rewrite_refuses_ext_proc_config_without_a_host() -> None:
    template = yaml.safe_load((PROJECT_ROOT / "envoy/full_duplex.yaml").read_text())
    with pytest.raises(StackError, match="extproc"):
        rewrite_envoy_config(template, extproc_port=None, upstream_port=2222)


def test_direct_envoy_and_echo() -> None:
    """envoy/direct.yaml + the echo, no host: bodies echo back, content-length and
    content-type preserved, /bytes/<n> served; stop() leaves no process and no temp dir."""

    async def exercise(stack: Stack) -> None:
        body = bytes(range(256)) * 4096 + b"!"  # 1 MiB + 1
        async with aiohttp.ClientSession() as session:
            headers = {"content-type": "application/x-test"}
            async with session.post(stack.url + "/direct", data=body, headers=headers) as resp:
                assert resp.status == 200
                assert resp.headers["content-length"] == str(len(body))
                assert resp.headers["content-type"] == "application/x-test"
                assert await resp.read() == body
            async with session.get(stack.url + "/bytes/100000") as resp:
                assert resp.headers["content-length"] == "100000"
                assert await resp.read() == b"".join(pattern(100000))
            async with session.get(stack.echo_url + "/") as resp:  # the echo itself, no body
                assert resp.status == 200
                assert resp.headers["content-length"] == "0"

    with Stack("envoy/direct.yaml", host_config=None) as stack:
        assert set(stack.pids) == {"echo", "envoy"}
        assert stack.envoy_rss() > 0
        assert stack.host_rss() == 0
        asyncio.run(exercise(stack))
        pids, tmpdir = list(stack.pids.values()), stack.tmpdir
    assert _gone(pids)
    assert tmpdir is not None and not tmpdir.exists()


def test_rss_sampler_records_peaks() -> None:
    with Stack("envoy/direct.yaml", host_config=None) as stack, stack.sampler(interval=0.05) as rss:
        asyncio.run(asyncio.sleep(0.3))
    assert len(rss.samples) >= 3
    assert rss.peak_envoy >= max(s.envoy for s in rss.samples) > 0
    assert rss.peak_host == 0


def test_failed_start_reports_log_tail_and_cleans_up() -> None:
    failing_host = [sys.executable, "-c", "import sys; print('no such plugin: nope', file=sys.stderr); sys.exit(3)"]
    stack = Stack("envoy/full_duplex.yaml", host_command=failing_host, start=False)
    with pytest.raises(StackError) as info:
        stack.start()
    message = str(info.value)
    assert "host exited with code 3" in message
    assert "no such plugin: nope" in message
    assert stack.pids == {}


@pytest.mark.parametrize(
    ("config", "route_modes"),
    [
        (
            "envoy/full_duplex.yaml",
            {
                "full-duplex-streamed": "FULL_DUPLEX_STREAMED",
                "streamed": "STREAMED",
                "buffered": "BUFFERED",
                "headers-only": "NONE",
                "default": "FULL_DUPLEX_STREAMED",
            },
        ),
        ("envoy/streamed.yaml", {"streamed": "STREAMED", "default": "STREAMED"}),
    ],
    ids=["full_duplex", "streamed"],
)
def test_routes_reach_processor_with_their_body_modes(config: str, route_modes: dict[str, str]) -> None:
    """Each route's name arrives as xds.route_name and its per-route processing_mode
    override (to and from FULL_DUPLEX_STREAMED) is what the processor is told."""

    async def check(stack: Stack) -> None:
        body = bytes(range(256)) * 8192  # 2 MiB
        async with aiohttp.ClientSession() as session:
            for route, mode in route_modes.items():
                async with session.post(stack.url + ROUTE_PATHS[route], data=body) as resp:
                    assert resp.status == 200, route
                    assert resp.headers["x-processor-route"] == route
                    assert resp.headers["x-processor-modes"] == f"{mode},{mode}"
                    assert await resp.read() == body, route

    with Stack(config, host_command=MINIMAL_PROCESSOR) as stack:
        asyncio.run(check(stack))


def test_buffered_route_takes_bodies_up_to_its_64mib_limit(payload) -> None:
    """The buffered route raises Envoy's buffer limit to 64 MiB for that route alone."""
    body = payload(16 * MiB)
    with Stack("envoy/full_duplex.yaml", host_command=MINIMAL_PROCESSOR) as stack:
        echoed = asyncio.run(h1_request(stack.url + ROUTE_PATHS["buffered"], body=body))
        assert echoed.status == 200
        assert echoed.sha256 == body.sha256
        try:
            too_big = asyncio.run(h1_request(stack.url + ROUTE_PATHS["buffered"], body=payload(65 * MiB)))
            assert too_big.status == 413
        except aiohttp.ClientError:
            pass  # Envoy may close the connection before the client reads the 413
        assert stack.envoy_stats("downstream_rq_too_large")["http.ingress.downstream_rq_too_large"] == 1


def test_pattern_is_deterministic() -> None:
    data = b"".join(pattern(3 * 65536 + 5))
    assert len(data) == 3 * 65536 + 5
    assert data[:65536] == data[65536 : 2 * 65536]
    assert hashlib.sha256(data[:65536]).hexdigest() == hashlib.sha256(b"".join(pattern(65536))).hexdigest()
