"""What a reload compares (reload.py), and ``envoy-config --diff``, which a reload that needs
Envoy's config changed points at."""

from __future__ import annotations

from pathlib import Path

import pytest

from extproc_host.cli import main
from extproc_host.registry import load_host
from extproc_host.reload import SettingsFile, envoy_changes, reload_host, restart_changes

BASE = '[server]\nlisten = "127.0.0.1:9001"\n[routes.default]\nchain = ["passthrough"]\n'

pytestmark = pytest.mark.usefixtures("no_extproc_env")


def settings(tmp_path: Path, text: str, name: str = "host.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_a_plugin_setting_changes_nothing_envoy_or_a_restart_must_know(tmp_path: Path) -> None:
    old = load_host(settings(tmp_path, BASE + '[plugins.file_tee]\ndirectory = "a"\n'))
    new = reload_host(settings(tmp_path, BASE + '[plugins.file_tee]\ndirectory = "b"\n', "new.toml"), old)
    assert new.needs_restart == () and new.envoy_changes == ()


def test_server_keys_that_need_a_restart_are_named(tmp_path: Path) -> None:
    old = load_host(settings(tmp_path, BASE))
    new = load_host(settings(tmp_path, BASE.replace("9001", "9002") + "", "new.toml"))
    assert restart_changes(old.settings.server, new.settings.server) == ("[server] listen",)


def test_routes_added_or_with_other_modes_are_envoy_changes(tmp_path: Path) -> None:
    old = load_host(settings(tmp_path, BASE))
    more = BASE + '[routes.api]\nchain = ["passthrough"]\npath_prefix = "/api"\nbody_mode = "STREAMED"\n'
    new = load_host(
        settings(
            tmp_path,
            more.replace(
                'chain = ["passthrough"]\n',
                'chain = ["passthrough"]\nbody_mode = "BUFFERED"\nbuffer_limit_bytes = 1048576\n',
                1,
            ),
            "new.toml",
        )
    )
    changes = envoy_changes(old, new)
    assert "routes added: api" in changes
    assert any(c.startswith("route default: what Envoy sends it") for c in changes)


def test_a_watched_file_changes_once_per_new_content(tmp_path: Path) -> None:
    path = Path(settings(tmp_path, BASE))
    watched = SettingsFile(str(path))
    assert not watched.changed()
    path.write_text(BASE + "# edited\n")
    assert watched.changed() and not watched.changed()
    path.unlink()  # a ConfigMap being swapped: no change until the new file is there
    assert not watched.changed()


def test_envoy_config_diff_says_whether_envoy_runs_what_the_settings_generate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = settings(tmp_path, BASE)
    running = tmp_path / "envoy.yaml"
    assert main(["envoy-config", "--config", config, "-o", str(running)]) == 0
    assert main(["envoy-config", "--config", config, "--diff", str(running)]) == 0
    assert "is what these settings generate" in capsys.readouterr().out
    other = settings(tmp_path, BASE + '[routes.api]\nchain = ["passthrough"]\npath_prefix = "/api"\n', "other.toml")
    assert main(["envoy-config", "--config", other, "--diff", str(running)]) == 1
    out = capsys.readouterr().out
    assert out.startswith(f"--- {running}") and "+                  prefix: /api" in out
    assert main(["envoy-config", "--config", config, "--diff", str(tmp_path / "missing.yaml")]) == 2
