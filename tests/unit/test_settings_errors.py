"""Bad settings: one readable paragraph naming file and key, exit status 2, no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from extproc_host.cli import main

REPO = Path(__file__).resolve().parents[2]


def run_check(
    tmp_path: Path, text: str, capsys, env: dict[str, str] | None = None, monkeypatch=None
) -> tuple[int, str]:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    for key, value in (env or {}).items():
        monkeypatch.setenv(key, value)
    code = main(["check", "--config", str(path)])
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[routes.default\n", ["not valid TOML", "line 1"]),
        ("[server]\nlisen = '1'\n[routes.default]\nchain=['passthrough']\n", ["key 'server.lisen': unknown key"]),
        (
            "[routes.default]\nchain = ['nope']\n",
            ["key 'routes.default.chain[0]'", "no plugin named 'nope' is installed; installed: ", "passthrough"],
        ),
        (
            "[routes.default]\nchain = ['pasthrough', 'file-tee']\n",
            [
                "key 'routes.default.chain[0]': no plugin named 'pasthrough' is installed (did you mean 'passthrough'?)",
                "key 'routes.default.chain[1]': no plugin named 'file-tee' is installed (did you mean 'file_tee'?)",
            ],
        ),
        ("[routes.default]\nchain = []\n", ["key 'routes.default.chain'"]),
        ("[routes.api]\nchain = ['passthrough']\n", ["key 'routes.default': required"]),
        (
            "[routes.default]\nchain=['passthrough']\n[plugins.passthrough]\nspeed = 3\n",
            ["key 'plugins.passthrough.speed': unknown key"],
        ),
        (
            "[routes.default]\nchain=['passthrough']\n[routes.default.plugins.passthrough]\nspeed = 3\n",
            ["key 'routes.default.plugins.passthrough.speed': unknown key"],
        ),
        (
            "[routes.default]\nchain=['passthrough']\n[plugins.ghost]\n",
            ["key 'plugins.ghost'", "installed: ", "passthrough"],
        ),
        (
            "[routes.default]\nchain=['passthrough']\nfailure_policy='maybe'\n",
            ["key 'routes.default.failure_policy'", "fail_closed"],
        ),
        (
            "[routes.default]\nchain=['passthrough']\npath_prefix='api'\n",
            ["key 'routes.default.path_prefix'", "must start with '/'"],
        ),
        ("[server]\nlisten='nowhere'\n[routes.default]\nchain=['passthrough']\n", ["key 'server.listen'", "HOST:PORT"]),
    ],
)
def test_bad_settings_are_named(tmp_path, capsys, text, expected):
    code, err = run_check(tmp_path, text, capsys)
    assert code == 2
    assert "bad.toml" in err
    for fragment in expected:
        assert fragment in err
    assert "Traceback" not in err


def test_environment_override_is_named(tmp_path, capsys, monkeypatch):
    code, err = run_check(
        tmp_path, "[routes.default]\nchain=['passthrough']\n", capsys, {"EXTPROC_SERVER__LISTEN": "bad"}, monkeypatch
    )
    assert code == 2
    assert "EXTPROC_SERVER__LISTEN" in err


def test_environment_override_applies(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("EXTPROC_SERVER__LISTEN", "127.0.0.1:9555")
    path = tmp_path / "ok.toml"
    path.write_text("[server]\nlisten = '127.0.0.1:9001'\n[routes.default]\nchain=['passthrough']\n")
    assert main(["check", "--config", str(path)]) == 0
    assert "listen 127.0.0.1:9555" in capsys.readouterr().out


def test_missing_file(tmp_path, capsys):
    assert main(["check", "--config", str(tmp_path / "absent.toml")]) == 2
    assert "absent.toml: settings file not found" in capsys.readouterr().err


@pytest.mark.parametrize("config", sorted((REPO / "config").glob("*.toml")))
def test_shipped_configs_are_valid(config, capsys):
    assert main(["check", "--config", str(config)]) == 0


def test_console_script_exits_2_without_traceback(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[routes.default]\nchain = ['nope']\n")
    proc = subprocess.run(
        [sys.executable, "-m", "extproc_host", "--config", str(bad)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert "no plugin named 'nope'" in proc.stderr and "Traceback" not in proc.stderr


def test_plugins_command_lists_passthrough(capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "passthrough" in out and "extproc-host" in out


def test_a_plugin_key_of_the_file_names_no_variable(tmp_path, capsys, monkeypatch):
    # A variable under a longer plugin name (passthroughx) is not one under this key.
    text = "[routes.default]\nchain=['passthrough']\n[plugins.passthrough]\nspeed = 3\n"
    code, err = run_check(tmp_path, text, capsys, {"EXTPROC_PLUGINS__PASSTHROUGHX__Y": "1"}, monkeypatch)
    assert code == 2
    lines = err.splitlines()
    assert any(line.endswith("key 'plugins.passthrough.speed': unknown key") for line in lines), err
    assert any(
        "key 'plugins.passthroughx' (set by environment variable EXTPROC_PLUGINS__PASSTHROUGHX__Y)" in line
        for line in lines
    ), err
