"""Observe-only chains leave the data path: a route whose every plugin declares
``observes_only`` gets Envoy's observability mode in the generated config, so a client's
exchange completes while the host has not even looked at its body, and the observer still
sees every byte afterwards (within Envoy's deferred-close timeout). Through a real Envoy."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from e2e_clients import MiB, h1_request
from ops_helpers import wait_until

from extproc_host.stack import Stack

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


def settings(tmp_path: Path, server: str = "") -> Path:
    config = tmp_path / "host.toml"
    config.write_text(
        f"""
[server]
plugin_modules = ["tests.e2e.observer_plugins"]
{server}

[plugins.gated_observer]
gate = "{tmp_path / "gate"}"
report = "{tmp_path / "report"}"

[plugins.file_tee]
directory = "{tmp_path / "tee"}"
request = true
response = true

[routes.observed]
chain = ["gated_observer"]
path_prefix = "/observed"

[routes.tee]
chain = ["file_tee"]
path_prefix = "/tee"

[routes.tee-in-path]
chain = ["file_tee"]
path_prefix = "/tee-in-path"
body_mode = "FULL_DUPLEX_STREAMED"

[routes.default]
chain = ["passthrough"]
"""
    )
    return config


def test_generated_config_puts_observe_only_routes_in_observability_mode(tmp_path: Path) -> None:
    cmd = [str(Path(sys.executable).with_name("extproc-host")), "envoy-config", "--config", str(settings(tmp_path))]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env={"PYTHONPATH": str(ROOT), "PATH": ""})
    config = yaml.safe_load(out.stdout)
    manager = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    filters = {f["name"]: f["typed_config"] for f in manager["http_filters"]}
    observer = filters["envoy.filters.http.ext_proc.observe"]
    assert observer["observability_mode"] is True and observer["failure_mode_allow"] is True
    routes = {
        r["name"]: r.get("typed_per_filter_config", {}) for r in manager["route_config"]["virtual_hosts"][0]["routes"]
    }
    main, watch = "envoy.filters.http.ext_proc", "envoy.filters.http.ext_proc.observe"
    for name in ("observed", "tee"):  # off the main filter, on the observer
        assert routes[name][main].get("disabled") is True
        assert not routes[name].get(watch, {}).get("disabled")
    # A forced body mode keeps the route in the data path; a chain that needs nothing uses neither.
    assert routes["tee-in-path"][watch]["disabled"] is True and not routes["tee-in-path"].get(main, {}).get("disabled")
    assert routes["default"][watch]["disabled"] is True and routes["default"][main]["disabled"] is True


async def test_client_does_not_wait_for_an_observer_that_has_not_looked_yet(tmp_path: Path, payload) -> None:
    body = payload(3 * MiB + 17)
    env = {"PYTHONPATH": str(ROOT)}
    with Stack(None, settings(tmp_path), host_env=env) as stack:
        # The observer holds every chunk until the gate opens, yet the exchange completes.
        answered = await h1_request(stack.url + "/observed/upload", body=body)
        assert (answered.status, answered.size, answered.sha256) == (200, body.size, body.sha256)
        assert not (tmp_path / "report").exists()
        (tmp_path / "gate").touch()  # now the observer looks, and sees every byte
        report = tmp_path / "report"
        wait_until(report.exists, 20, "the observer's report")
        assert report.read_text() == f"{body.size} {body.sha256}"


async def test_file_tee_alone_observes_and_its_copies_are_complete(tmp_path: Path, payload) -> None:
    body = payload(5 * MiB + 3)
    env = {"PYTHONPATH": str(ROOT)}
    with Stack(None, settings(tmp_path), host_env=env) as stack:
        answered = await h1_request(stack.url + "/tee/upload", body=body)
        assert (answered.status, answered.size, answered.sha256) == (200, body.size, body.sha256)
        tee = tmp_path / "tee"
        wait_until(lambda: len(list(tee.glob("*.body"))) == 2, 20, "both copies to be complete")
        copies = sorted(tee.glob("*.body"))
        assert [hashlib.sha256(p.read_bytes()).hexdigest() for p in copies] == [body.sha256, body.sha256]


async def test_an_observer_too_far_behind_stops_observing_and_the_client_never_waits(tmp_path: Path, payload) -> None:
    """Past [server] observe_buffer_bytes of backlog the host stops observing the exchange (the
    plugins are closed with ObserverBehind); the client's exchange goes on untouched."""
    body = payload(6 * MiB + 5)
    env = {"PYTHONPATH": str(ROOT)}
    with Stack(None, settings(tmp_path, "observe_buffer_bytes = 1048576"), host_env=env) as stack:
        answered = await h1_request(stack.url + "/observed/upload", body=body)
        assert (answered.status, answered.size, answered.sha256) == (200, body.size, body.sha256)
        report = tmp_path / "report"
        wait_until(report.exists, 20, "the observer to be closed")
        assert report.read_text().startswith("closed with ObserverBehind: ")
        assert "[server] observe_buffer_bytes" in report.read_text()
        # The host serves on: the next exchange on the route is observed again.
        (tmp_path / "gate").touch()
        report.unlink()
        small = payload(1000)
        again = await h1_request(stack.url + "/observed/again", body=small)
        assert (again.status, again.sha256) == (200, small.sha256)
        wait_until(report.exists, 20, "the second observation")
        assert report.read_text() == f"{small.size} {small.sha256}"
