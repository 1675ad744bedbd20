"""Start-up errors that name the culprit: a distribution whose plugin module fails to import, a
plugin class without a name, a name clash through plugin_modules, a BUFFERED route without a
buffer limit; hyphenated plugin names set from the environment."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict

from extproc_host import Headers, Plugin, hookimpl
from extproc_host.cli import main
from extproc_host.errors import ConfigError
from extproc_host.registry import build_routes, discover, load_host, make_plugin_manager
from extproc_host.settings import load_settings

REPO = Path(__file__).resolve().parents[2]


def install_broken_distribution(site: Path) -> None:
    """A distribution 'extproc-broken' 1.2 whose entry point 'broken' names a missing module."""
    info = site / "extproc_broken-1.2.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: extproc-broken\nVersion: 1.2\n")
    (info / "entry_points.txt").write_text("[extproc_host.plugins]\nbroken = extproc_broken_missing_module\n")


@pytest.fixture
def broken_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    site = tmp_path / "site"
    install_broken_distribution(site)
    monkeypatch.syspath_prepend(str(site))
    return site


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "host.toml"
    path.write_text(text)
    return path


def test_a_broken_distribution_is_recorded_not_raised(broken_site: Path, tmp_path: Path) -> None:
    pm = make_plugin_manager()
    plugins = discover(pm)
    assert "passthrough" in plugins
    broken = pm.broken["broken"]
    assert (broken.distribution, broken.version) == ("extproc-broken", "1.2")
    assert "extproc_broken_missing_module" in broken.error
    # A route that does not use it starts.
    host = load_host(write(tmp_path, '[routes.default]\nchain = ["passthrough"]\n'))
    assert list(host.routes) == ["default"]


def test_only_a_route_using_the_broken_plugin_fails_naming_it(broken_site: Path, tmp_path: Path, capsys) -> None:
    path = write(tmp_path, '[routes.default]\nchain = ["broken"]\n')
    assert main(["check", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "key 'routes.default.chain[0]'" in err
    assert "plugin 'broken' failed to load (entry point 'broken' of extproc-broken 1.2)" in err
    assert "No module named 'extproc_broken_missing_module'" in err


def test_plugins_lists_a_broken_distribution(broken_site: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(broken_site), *sys.path]), "COLUMNS": "200"}
    result = subprocess.run(
        [sys.executable, "-m", "extproc_host", "plugins"], capture_output=True, text=True, env=env, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "passthrough" in result.stdout
    assert "extproc-broken" in result.stdout
    assert "BROKEN" in result.stdout
    assert "extproc_broken_missing_module" in result.stdout


class Nameless(Plugin):
    pass


class Echoer(Plugin):
    name = "passthrough"  # the built-in's name


def test_a_class_without_a_name_is_a_settings_error(tmp_path: Path, monkeypatch, capsys) -> None:
    module = types.ModuleType("nameless_plugins")
    module.register_plugins = hookimpl(lambda register: register(Nameless))  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "nameless_plugins", module)
    path = write(
        tmp_path, '[server]\nplugin_modules = ["nameless_plugins"]\n[routes.default]\nchain = ["passthrough"]\n'
    )
    assert main(["check", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "module nameless_plugins (server.plugin_modules) registered plugin class" in err
    assert "Nameless without a name" in err
    assert "Traceback" not in err


def test_a_name_clash_through_plugin_modules_names_the_module(tmp_path: Path, monkeypatch) -> None:
    module = types.ModuleType("clashing_plugins")
    module.register_plugins = hookimpl(lambda register: register(Echoer))  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "clashing_plugins", module)
    path = write(
        tmp_path, '[server]\nplugin_modules = ["clashing_plugins"]\n[routes.default]\nchain = ["passthrough"]\n'
    )
    with pytest.raises(ConfigError) as caught:
        load_host(path)
    assert "registered twice: by extproc-host and by module clashing_plugins (server.plugin_modules)" in str(
        caught.value
    )


def test_check_refuses_what_envoy_config_refuses_and_shows_the_modes(tmp_path: Path, capsys) -> None:
    bad = write(tmp_path, '[routes.default]\nchain = ["passthrough"]\nbody_mode = "BUFFERED"\n')
    assert main(["check", "--config", str(bad)]) == 2
    check_err = capsys.readouterr().err
    assert main(["envoy-config", "--config", str(bad)]) == 2
    assert capsys.readouterr().err == check_err
    assert "routes.default.buffer_limit_bytes': required" in check_err
    good = write(tmp_path, '[routes.default]\nchain = ["passthrough"]\nbody_mode = "STREAMED"\n')
    assert main(["check", "--config", str(good)]) == 0
    out = capsys.readouterr().out
    assert "request body STREAMED" in out
    assert "response trailers SEND" in out


def test_headers_given_by_hand_are_case_insensitive() -> None:
    headers = Headers([("X-Api-Key", "k")])
    assert headers.get("x-api-key") == "k"
    assert "X-API-KEY" in headers
    assert list(headers.items()) == [("x-api-key", "k")]


class AddHeader(Plugin):
    name = "add-header"

    from pydantic import BaseModel as _Base

    class Settings(_Base):
        name: str = "x-added"
        value: str = "1"


def test_hyphenated_plugin_settings_from_the_environment(tmp_path: Path, monkeypatch, no_extproc_env) -> None:
    path = write(
        tmp_path,
        '[routes.default]\nchain = ["add-header"]\n[plugins.add-header]\nname = "x-file"\nvalue = "file"\n',
    )
    monkeypatch.setenv("EXTPROC_PLUGINS__ADD_HEADER__NAME", "x-env")
    pm = make_plugin_manager(load_entry_points=False)
    routes = build_routes(load_settings(path), discover(pm, [AddHeader]), str(path))
    settings = routes["default"].chain[0].settings
    assert (settings.name, settings.value) == ("x-env", "file")  # the environment wins, the rest stays


def test_a_cut_short_body_is_not_blamed_on_max_message_bytes_alone() -> None:
    from extproc_host.admission import Admission, Limits
    from extproc_host.processor import Router
    from extproc_host.registry import load_host

    admission = Admission(Router(load_host(None).routes), limits=Limits(max_message_bytes=4194304))
    reason = admission.cut_short_reason("the request body ended before it was complete")
    assert "client or upstream went away" in reason
    assert "413" in reason
    assert "max_message_bytes (4194304 bytes)" in reason
    assert "Envoy cancelled the stream" in admission.cancelled_reason("cut")
    admission.accepting = False  # shutting down: the host cancelled it, not Envoy
    assert "shutdown grace period" in admission.cancelled_reason("cut")


class CardMaskSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    width: int = 19


class CardMask(Plugin):
    name = "card-mask"
    Settings = CardMaskSettings


@pytest.mark.parametrize(
    ("variable", "key", "problem"),
    [
        ("EXTPROC_PLUGINS__CARD_MASK__WIDTH", "plugins.card-mask.width", "valid integer"),
        ("EXTPROC_PLUGINS__CARD_MASK__WIDHT", "plugins.card-mask.widht", "unknown key"),
    ],
)
def test_a_bad_plugin_setting_from_the_environment_names_its_variable(
    tmp_path: Path, monkeypatch, no_extproc_env, variable: str, key: str, problem: str
) -> None:
    # The file has no such key: the error must send the reader to the environment, under the
    # '_' spelling a shell needs for the '-' of the plugin's name.
    path = write(tmp_path, '[routes.default]\nchain = ["card-mask"]\n[plugins.card-mask]\nwidth = 4\n')
    monkeypatch.setenv(variable, "wide")
    pm = make_plugin_manager(load_entry_points=False)
    with pytest.raises(ConfigError) as refused:
        build_routes(load_settings(path), discover(pm, [CardMask]), str(path))
    assert f"key '{key}' (set by environment variable {variable}): " in str(refused.value)
    assert problem in str(refused.value)


def test_a_plugin_module_in_the_working_directory_but_not_on_the_path_says_so(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    # The console script's sys.path has no working directory: the module beside the settings
    # is not found, and the error says what to do about it.
    (tmp_path / "beside_plugins.py").write_text("")
    path = write(tmp_path, '[server]\nplugin_modules = ["beside_plugins"]\n[routes.default]\nchain = ["passthrough"]\n')
    monkeypatch.chdir(tmp_path)
    assert main(["check", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "key 'server.plugin_modules[0]': cannot import 'beside_plugins'" in err
    assert "beside_plugins is in the working directory, which is not on the host's import path: PYTHONPATH=." in err
    # Elsewhere, it only says where modules are looked for.
    monkeypatch.chdir(tmp_path.parent)
    assert main(["check", "--config", str(path)]) == 2
    assert "looked for in site-packages and PYTHONPATH" in capsys.readouterr().err
