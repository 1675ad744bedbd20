"""Which routes leave the data path (modes.observes_only / route_modes(...).observe)."""

from __future__ import annotations

import pytest

from extproc_host import Needs, NoSettings, Plugin
from extproc_host.modes import route_modes
from extproc_host.routes import ChainLink, PluginInfo, Route
from extproc_host.settings import RouteSettings


class Watcher(Plugin):
    name = "watcher"
    observes_only = True

    def on_request_body(self, chunk: bytes) -> bytes:
        return chunk


class Changer(Plugin):
    name = "changer"

    def on_request_body(self, chunk: bytes) -> bytes:
        return chunk.upper()


class WholeWatcher(Watcher):
    name = "whole_watcher"
    needs = Needs(request_body="buffered")


def route(*plugins: type[Plugin]) -> Route:
    links = tuple(ChainLink(PluginInfo(p.name, p, "tests", "0", ()), NoSettings()) for p in plugins)
    return Route("r", links, "fail_closed", "/r")


@pytest.mark.parametrize(
    ("plugins", "settings", "observe", "request_body"),
    [
        ((Watcher,), {}, True, "STREAMED"),
        ((Watcher, Watcher), {}, True, "STREAMED"),
        ((Watcher, Changer), {}, False, "FULL_DUPLEX_STREAMED"),
        ((Changer,), {}, False, "FULL_DUPLEX_STREAMED"),
        # A forced body mode is a request to stay in the data path.
        ((Watcher,), {"body_mode": "FULL_DUPLEX_STREAMED"}, False, "FULL_DUPLEX_STREAMED"),
        # Observability mode cannot send a whole body.
        ((WholeWatcher,), {"buffer_limit_bytes": 1024}, False, "BUFFERED"),
    ],
)
def test_observe_only_routes(
    plugins: tuple[type[Plugin], ...], settings: dict, observe: bool, request_body: str
) -> None:
    modes = route_modes(route(*plugins), RouteSettings(chain=[p.name for p in plugins], **settings), "test.toml")
    assert (modes.observe, modes.request_body) == (observe, request_body)


def test_check_says_an_observe_only_route_is_off_the_data_path(tmp_path, capsys) -> None:
    # file_tee alone observes: Envoy sends a copy with failure_mode_allow, so the route's
    # fail_closed policy cannot reach the client and check must not print it as if it did.
    from extproc_host.cli import main

    config = tmp_path / "host.toml"
    config.write_text(
        '[routes.default]\nchain = ["passthrough"]\nbody_mode = "FULL_DUPLEX_STREAMED"\n\n'
        f'[routes.copy]\nchain = ["file_tee"]\npath_prefix = "/copy"\n\n[plugins.file_tee]\ndirectory = "{tmp_path}"\n'
    )
    assert main(["check", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "route copy (path prefix /copy): file_tee [observe only: failures never reach the client]" in out
    assert "Envoy sends: a copy, in observability mode (Envoy awaits no answer): request headers" in out
    assert "route default: passthrough [fail_closed]\n  Envoy sends: request headers, request body FULL" in out
