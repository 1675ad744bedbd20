"""What ships inside the package for commands run without a checkout: the demo settings are
config/full_duplex.toml, the starter settings ``init`` writes pass the host's own checks, and
``init`` refuses to overwrite without ``--force``. And the drain delay's default matches the
health check the shipped Envoy configs use."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import yaml

from extproc_host.cli import main
from extproc_host.data import DEMO_SETTINGS, STARTER_SETTINGS, data_path
from extproc_host.drain import DEFAULT_DRAIN_SECONDS, HEALTH_CHECK_INTERVAL, UNHEALTHY_THRESHOLD, drain_seconds_for
from extproc_host.registry import load_host
from extproc_host.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def test_demo_settings_are_the_checkouts_full_duplex_settings() -> None:
    assert data_path(DEMO_SETTINGS).read_text() == (ROOT / "config/full_duplex.toml").read_text()


def test_starter_settings_pass_the_hosts_checks(no_extproc_env: None) -> None:
    host = load_host(str(data_path(STARTER_SETTINGS)))
    assert set(host.routes) == {"default", "upload"}
    assert host.settings.server.drain_seconds == DEFAULT_DRAIN_SECONDS


def test_starter_server_keys_are_the_shipped_defaults() -> None:
    # The starter shows the defaults it documents: a value that differs (no budget where the
    # host has one) would quietly turn off the memory budget of every new install.
    written = tomllib.loads(data_path(STARTER_SETTINGS).read_text())["server"]
    defaults = Settings().server
    assert {"max_concurrent_streams", "max_held_bytes", "idle_timeout_seconds"} <= set(written)
    assert {key: getattr(defaults, key) for key in written} == written


def test_init_writes_refuses_and_forces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["init"]) == 0
    written = (tmp_path / "extproc-host.toml").read_text()
    assert written == data_path(STARTER_SETTINGS).read_text()
    assert not (tmp_path / "envoy.yaml").exists()
    (tmp_path / "extproc-host.toml").write_text("# mine\n")
    assert main(["init"]) == 1
    assert "--force" in capsys.readouterr().err
    assert (tmp_path / "extproc-host.toml").read_text() == "# mine\n"
    assert main(["init", "--envoy", "--force"]) == 0
    assert (tmp_path / "extproc-host.toml").read_text() == written
    envoy = (tmp_path / "envoy.yaml").read_text()
    assert "--health-check 2" in envoy.splitlines()[1] and "drain_seconds must be at least 5 " in envoy
    # Loopback only: the starter's /upload route copies every body it gets to disk.
    listener = yaml.safe_load(envoy)["static_resources"]["listeners"][0]["address"]["socket_address"]
    assert listener == {"address": "127.0.0.1", "port_value": 18080}


def test_default_drain_covers_the_shipped_health_check() -> None:
    assert (
        DEFAULT_DRAIN_SECONDS == drain_seconds_for(HEALTH_CHECK_INTERVAL) > HEALTH_CHECK_INTERVAL * UNHEALTHY_THRESHOLD
    )
    assert Settings().server.drain_seconds == DEFAULT_DRAIN_SECONDS
    assert drain_seconds_for(0.5) == 2.0


def test_envoy_config_warns_when_drain_is_shorter_than_the_health_check_needs(tmp_path: Path, capsys) -> None:
    config = tmp_path / "host.toml"
    config.write_text('[server]\ndrain_seconds = 3\n\n[routes.default]\nchain = ["passthrough"]\n')
    assert main(["envoy-config", "--config", str(config), "--health-check", "2", "-o", str(tmp_path / "e.yaml")]) == 0
    assert "drain_seconds = 3 is shorter than this health check needs (5)" in capsys.readouterr().err
    assert main(["envoy-config", "--config", str(config), "--health-check", "1", "-o", str(tmp_path / "e.yaml")]) == 0
    assert "warning" not in capsys.readouterr().err
