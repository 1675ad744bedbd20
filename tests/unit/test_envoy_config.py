"""``extproc-host envoy-config``: routes, body modes from the chain's needs, failure policy,
clusters and options, and the settings it refuses (exit status 2, file and key named)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from extproc_host.cli import main
from extproc_host.plugin import Needs, Plugin, inferred_needs

from . import needs_plugins

HEAD = '[server]\nplugin_modules = ["tests.unit.needs_plugins"]\n'
EXT_PROC = "envoy.filters.http.ext_proc"


pytestmark = pytest.mark.usefixtures("no_extproc_env")


def render(tmp_path: Path, settings: str, *options: str) -> dict:
    """Run the command on ``settings``; the bootstrap it wrote, as plain data."""
    config, out = tmp_path / "settings.toml", tmp_path / "envoy.yaml"
    config.write_text(HEAD + settings)
    assert main(["envoy-config", "--config", str(config), "-o", str(out), *options]) == 0
    return yaml.safe_load(out.read_text())


def refuse(tmp_path: Path, settings: str, capsys: pytest.CaptureFixture[str], *options: str) -> str:
    """Run the command on bad ``settings``; its error text (exit status 2 checked)."""
    config = tmp_path / "bad.toml"
    config.write_text(HEAD + settings)
    assert main(["envoy-config", "--config", str(config), *options]) == 2
    err = capsys.readouterr().err
    assert str(config) in err or options
    return err


def manager(bootstrap: dict) -> dict:
    return bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]


def routes(bootstrap: dict) -> list[dict]:
    return manager(bootstrap)["route_config"]["virtual_hosts"][0]["routes"]


def ext_proc_filter(bootstrap: dict) -> dict:
    (found,) = [f["typed_config"] for f in manager(bootstrap)["http_filters"] if f["name"] == EXT_PROC]
    return found


def mode_of(bootstrap: dict, route: str) -> dict | str:
    """The route's effective processing mode (defaults filled in), or "disabled"."""
    (entry,) = [r for r in routes(bootstrap) if r["name"] == route]
    per_route = entry.get("typed_per_filter_config", {}).get(EXT_PROC, {})
    if per_route.get("disabled"):
        return "disabled"
    mode = per_route.get("overrides", {}).get("processing_mode") or ext_proc_filter(bootstrap)["processing_mode"]
    defaults = {
        "request_header_mode": "DEFAULT",
        "response_header_mode": "DEFAULT",
        "request_body_mode": "NONE",
        "response_body_mode": "NONE",
        "request_trailer_mode": "DEFAULT",
        "response_trailer_mode": "DEFAULT",
    }
    return {**defaults, **mode}


def failure_mode_allow(bootstrap: dict, route: str) -> bool:
    (entry,) = [r for r in routes(bootstrap) if r["name"] == route]
    overrides = entry.get("typed_per_filter_config", {}).get(EXT_PROC, {}).get("overrides", {})
    return overrides.get("failure_mode_allow", ext_proc_filter(bootstrap).get("failure_mode_allow", False))


def cluster(bootstrap: dict, name: str) -> dict:
    (found,) = [c for c in bootstrap["static_resources"]["clusters"] if c["name"] == name]
    return found


def endpoint(bootstrap: dict, name: str) -> dict:
    return cluster(bootstrap, name)["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]


# ---- needs ----


def test_needs_inferred_from_hooks() -> None:
    assert inferred_needs(needs_plugins.ResponseOnly) == Needs(response_body="streamed")
    assert inferred_needs(needs_plugins.StampResponse) == Needs(response_headers=True)
    assert inferred_needs(needs_plugins.CloseOnly) == Needs()
    assert not Needs().anything


def test_needs_declared_and_union() -> None:
    assert needs_plugins.WholeRequest.needs_for(None) == Needs(request_body="buffered")  # type: ignore[arg-type]
    both = Needs(request_body="streamed", response_headers=True) | Needs(request_body="buffered")
    assert both == Needs(request_body="buffered", response_headers=True)


def test_builtin_plugins_need_only_what_their_settings_use() -> None:
    from extproc_host_plugins.file_tee import FileTee, FileTeeSettings
    from extproc_host_plugins.zstd import Zstd, ZstdSettings

    assert FileTee.needs_for(FileTeeSettings(request=False)) == Needs(response_body="streamed")
    assert Zstd.needs_for(ZstdSettings(decompress_requests=False)) == Needs(
        request_headers=True, response_headers=True, response_body="streamed"
    )
    assert issubclass(FileTee, Plugin)


# ---- modes per route ----


def test_response_only_chain_asks_for_the_response_body_alone(tmp_path: Path) -> None:
    bootstrap = render(tmp_path, '[routes.default]\nchain = ["response_only"]\n')
    assert mode_of(bootstrap, "default") == {
        "request_header_mode": "SEND",
        "response_header_mode": "SKIP",
        "request_body_mode": "NONE",
        "response_body_mode": "FULL_DUPLEX_STREAMED",
        "request_trailer_mode": "SKIP",
        "response_trailer_mode": "SEND",
    }


def test_modes_follow_each_chain(tmp_path: Path) -> None:
    bootstrap = render(
        tmp_path,
        '[routes.whole]\nchain = ["whole_request"]\npath_prefix = "/whole"\nbuffer_limit_bytes = 1048576\n'
        '[routes.trailers]\nchain = ["request_trailers"]\npath_prefix = "/trailers"\n'
        '[routes.stamp]\nchain = ["stamp_response", "close_only"]\npath_prefix = "/stamp"\n'
        '[routes.nothing]\nchain = ["close_only", "passthrough"]\npath_prefix = "/nothing"\n'
        '[routes.forced]\nchain = ["passthrough"]\npath_prefix = "/forced"\nbody_mode = { request = "STREAMED" }\n'
        '[routes.default]\nchain = ["response_only"]\n',
    )
    whole = mode_of(bootstrap, "whole")
    assert (whole["request_body_mode"], whole["response_body_mode"]) == ("BUFFERED", "NONE")
    assert (whole["request_trailer_mode"], whole["response_header_mode"]) == ("SEND", "SKIP")
    (whole_route,) = [r for r in routes(bootstrap) if r["name"] == "whole"]
    assert whole_route["request_body_buffer_limit"] == 1048576
    trailers = mode_of(bootstrap, "trailers")
    assert trailers["request_trailer_mode"] == "SEND" and trailers["request_body_mode"] == "NONE"
    stamp = mode_of(bootstrap, "stamp")
    assert stamp["response_header_mode"] == "SEND" and stamp["response_body_mode"] == "NONE"
    assert mode_of(bootstrap, "nothing") == "disabled"
    forced = mode_of(bootstrap, "forced")
    assert (forced["request_body_mode"], forced["response_body_mode"]) == ("STREAMED", "NONE")
    assert forced["request_trailer_mode"] == "SEND"


def test_send_adds_parts_the_chain_does_not_need(tmp_path: Path) -> None:
    everything = '["request_body", "request_trailers", "response_headers", "response_body", "response_trailers"]'
    bootstrap = render(tmp_path, f'[routes.default]\nchain = ["response_only"]\nsend = {everything}\n')
    mode = mode_of(bootstrap, "default")
    assert set(mode.values()) == {"SEND", "FULL_DUPLEX_STREAMED"}


def test_routes_longest_prefix_first_default_last(tmp_path: Path) -> None:
    bootstrap = render(
        tmp_path,
        '[routes.default]\nchain = ["passthrough"]\n'
        '[routes.api]\nchain = ["passthrough"]\npath_prefix = "/api"\n'
        '[routes.api-upload]\nchain = ["passthrough"]\npath_prefix = "/api/upload"\n'
        '[routes.b]\nchain = ["passthrough"]\npath_prefix = "/b"\n',
    )
    assert [(r["name"], r["match"]["prefix"]) for r in routes(bootstrap)] == [
        ("api-upload", "/api/upload"),
        ("api", "/api"),
        ("b", "/b"),
        ("default", "/"),
    ]
    assert all(r["route"] == {"cluster": "upstream", "timeout": "0s"} for r in routes(bootstrap))
    assert ext_proc_filter(bootstrap)["request_attributes"] == ["xds.route_name"]


def test_failure_policy_becomes_failure_mode_allow(tmp_path: Path) -> None:
    bootstrap = render(
        tmp_path,
        '[routes.open]\nchain = ["response_only"]\npath_prefix = "/open"\nfailure_policy = "fail_open"\n'
        '[routes.default]\nchain = ["response_only"]\n',
    )
    assert failure_mode_allow(bootstrap, "open") is True
    assert failure_mode_allow(bootstrap, "default") is False
    bootstrap = render(
        tmp_path,
        '[routes.closed]\nchain = ["response_only"]\npath_prefix = "/closed"\n'
        '[routes.default]\nchain = ["response_only"]\nfailure_policy = "fail_open"\n',
    )
    assert failure_mode_allow(bootstrap, "closed") is False
    assert failure_mode_allow(bootstrap, "default") is True


# ---- clusters, listener, options ----


def test_clusters_and_options(tmp_path: Path) -> None:
    bootstrap = render(
        tmp_path,
        '[routes.default]\nchain = ["response_only"]\n',
        "--port",
        "10000",
        "--admin-port",
        "10001",
        "--upstream",
        "echo.internal:8081",
        "--host-address",
        "10.1.2.3:9100",
        "--message-timeout",
        "2.5",
    )
    assert bootstrap["admin"]["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 10001}
    listener = bootstrap["static_resources"]["listeners"][0]["address"]["socket_address"]
    assert listener == {"address": "0.0.0.0", "port_value": 10000}
    assert cluster(bootstrap, "extproc")["type"] == "STATIC"
    assert endpoint(bootstrap, "extproc")["socket_address"] == {"address": "10.1.2.3", "port_value": 9100}
    assert (
        "http2_protocol_options"
        in cluster(bootstrap, "extproc")["typed_extension_protocol_options"][
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
        ]["explicit_http_config"]
    )
    assert cluster(bootstrap, "upstream")["type"] == "STRICT_DNS"
    assert endpoint(bootstrap, "upstream")["socket_address"] == {"address": "echo.internal", "port_value": 8081}
    assert ext_proc_filter(bootstrap)["message_timeout"] == "2.500s"
    assert cluster(bootstrap, "upstream")["dns_lookup_family"] == "V4_ONLY"  # container DNS names
    assert "health_checks" not in cluster(bootstrap, "extproc")
    checked = render(tmp_path, '[routes.default]\nchain = ["response_only"]\n', "--health-check", "2")
    (check,) = cluster(checked, "extproc")["health_checks"]
    assert check["interval"] == check["no_traffic_interval"] == "2s" and "grpc_health_check" in check
    exposed = render(tmp_path, '[routes.default]\nchain = ["response_only"]\n', "--admin-address", "0.0.0.0")
    assert exposed["admin"]["address"]["socket_address"] == {"address": "0.0.0.0", "port_value": 9901}


def test_envoy_memory_options_set_windows_and_buffer_limits(tmp_path: Path) -> None:
    settings = '[routes.default]\nchain = ["response_only"]\n'
    default = render(tmp_path, settings)
    assert "per_connection_buffer_limit_bytes" not in cluster(default, "extproc")
    assert "per_connection_buffer_limit_bytes" not in default["static_resources"]["listeners"][0]
    small = render(
        tmp_path,
        settings,
        *("--extproc-window", "65536", "--extproc-buffer-limit", "65536", "--listener-buffer-limit", "32768"),
    )
    extproc = cluster(small, "extproc")
    h2 = extproc["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    windows = h2["explicit_http_config"]["http2_protocol_options"]
    assert windows == {
        "max_concurrent_streams": 1000,  # [server.http2] max_concurrent_streams: never more than the host takes
        "initial_stream_window_size": 65536,
        "initial_connection_window_size": 16 * 65536,
    }
    assert extproc["per_connection_buffer_limit_bytes"] == 65536
    assert small["static_resources"]["listeners"][0]["per_connection_buffer_limit_bytes"] == 32768


def test_host_cluster_defaults_to_the_settings_listen_address(tmp_path: Path) -> None:
    settings = '[routes.default]\nchain = ["response_only"]\n'
    config = tmp_path / "s.toml"
    config.write_text('[server]\nlisten = "0.0.0.0:9555"\nplugin_modules = ["tests.unit.needs_plugins"]\n' + settings)
    out = tmp_path / "e.yaml"
    assert main(["envoy-config", "--config", str(config), "-o", str(out)]) == 0
    bootstrap = yaml.safe_load(out.read_text())
    assert endpoint(bootstrap, "extproc")["socket_address"] == {"address": "127.0.0.1", "port_value": 9555}
    assert out.read_text().startswith(f"# Envoy bootstrap generated from {config}")
    unix = render(tmp_path, settings, "--host-address", "unix:/run/extproc.sock")
    assert endpoint(unix, "extproc") == {"pipe": {"path": "/run/extproc.sock"}}


def test_several_host_addresses_are_endpoints_of_one_cluster(tmp_path: Path) -> None:
    # Two hosts on one machine behind one Envoy (scaling down without losing a request) need
    # both in the extproc cluster, health-checked, without editing the generated file.
    settings = '[routes.default]\nchain = ["response_only"]\n'
    hosts = ("--host-address", "127.0.0.1:9001", "--host-address", "127.0.0.1:9002")
    two = render(tmp_path, settings, *hosts, "--health-check", "2")
    extproc = cluster(two, "extproc")
    (locality,) = extproc["load_assignment"]["endpoints"]
    ports = [e["endpoint"]["address"]["socket_address"]["port_value"] for e in locality["lb_endpoints"]]
    assert (extproc["type"], ports, len(extproc["health_checks"])) == ("STATIC", [9001, 9002], 1)
    header = (tmp_path / "envoy.yaml").read_text().splitlines()[1]
    assert "--host-address 127.0.0.1:9001 --host-address 127.0.0.1:9002 --health-check 2" in header
    named = cluster(
        render(tmp_path, settings, "--host-address", "10.0.0.1:9001", "--host-address", "host:9001"), "extproc"
    )
    assert named["type"] == "STRICT_DNS"
    assert len(named["load_assignment"]["endpoints"][0]["lb_endpoints"]) == 2


def test_google_grpc_client_reaches_the_one_host_address_with_the_message_limit(tmp_path: Path) -> None:
    # HEAD opens [server]: the key below is in it.
    settings = 'max_message_bytes = 8388608\n[routes.default]\nchain = ["response_only"]\n'
    google = render(tmp_path, settings, "--grpc-client", "google")
    service = ext_proc_filter(google)["grpc_service"]
    assert list(service) == ["google_grpc"]
    assert service["google_grpc"]["target_uri"] == "127.0.0.1:9001"
    assert [c["name"] for c in google["static_resources"]["clusters"]] == ["upstream"]
    args = service["google_grpc"]["channel_args"]["args"]
    assert args["grpc.max_receive_message_length"] == {"int_value": "8388608"}  # [server] max_message_bytes
    unix = render(
        tmp_path,
        '[routes.default]\nchain = ["response_only"]\n',
        "--grpc-client",
        "google",
        "--host-address",
        "unix:/run/x.sock",
    )
    assert ext_proc_filter(unix)["grpc_service"]["google_grpc"]["target_uri"] == "unix:/run/x.sock"
    header = (tmp_path / "envoy.yaml").read_text().splitlines()[1]
    assert "--grpc-client google" in header
    envoy = render(tmp_path, '[routes.default]\nchain = ["response_only"]\n')
    assert ext_proc_filter(envoy)["grpc_service"] == {"envoy_grpc": {"cluster_name": "extproc"}}


def test_no_ext_proc_renders_the_direct_reference(tmp_path: Path) -> None:
    bootstrap = render(tmp_path, '[routes.default]\nchain = ["response_only"]\n', "--no-ext-proc")
    assert [f["name"] for f in manager(bootstrap)["http_filters"]] == ["envoy.filters.http.router"]
    assert [c["name"] for c in bootstrap["static_resources"]["clusters"]] == ["upstream"]
    assert "typed_per_filter_config" not in routes(bootstrap)[0]


# ---- refused ----


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        (
            '[routes.api]\nchain = ["passthrough"]\n[routes.default]\nchain = ["passthrough"]\n',
            ["key 'routes.api.path_prefix'", "required", "only 'default'"],
        ),
        (
            '[routes.a]\nchain = ["passthrough"]\npath_prefix = "/x"\n[routes.b]\nchain = ["passthrough"]\n'
            'path_prefix = "/x"\n[routes.default]\nchain = ["passthrough"]\n',
            ["key 'routes.b.path_prefix'", "route 'a'"],
        ),
        (
            '[routes.default]\nchain = ["response_only"]\nbody_mode = "NONE"\n',
            ["key 'routes.default.body_mode'", "NONE for the response body", "'response_only' needs"],
        ),
        (
            '[routes.default]\nchain = ["whole_request"]\nbody_mode = "FULL_DUPLEX_STREAMED"\nbuffer_limit_bytes = 10\n',
            ["key 'routes.default.body_mode'", "'whole_request' needs the whole request body", "BUFFERED"],
        ),
        (
            '[routes.default]\nchain = ["whole_request"]\n',
            ["key 'routes.default.buffer_limit_bytes'", "required", "BUFFERED"],
        ),
        (
            '[routes.default]\nchain = ["response_only"]\nbuffer_limit_bytes = 1024\n',
            ["key 'routes.default.buffer_limit_bytes'", "only applies to BUFFERED"],
        ),
        (
            '[routes.default]\nchain = ["passthrough"]\nbody_mode = "SOMETIMES"\n',
            ["key 'routes.default.body_mode", "FULL_DUPLEX_STREAMED"],
        ),
        (
            '[routes.default]\nchain = ["passthrough"]\nsend = ["request_headerz"]\n',
            ["key 'routes.default.send[0]'", "response_headers"],
        ),
    ],
    ids=[
        "no-prefix",
        "same-prefix",
        "none-but-needed",
        "streamed-but-buffered",
        "buffered-no-limit",
        "limit-not-buffered",
        "bad-mode",
        "bad-send",
    ],
)
def test_bad_settings_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], settings: str, expected: list[str]
) -> None:
    err = refuse(tmp_path, settings, capsys)
    assert "Traceback" not in err
    for text in expected:
        assert text in err


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["--listen", "nowhere"], "--listen/--port"),
        (["--upstream", "a:b"], "--upstream"),
        (["--admin-address", "envoy-admin"], "--admin-address"),
        (["--health-check", "0"], "--health-check"),
        (["--host-address", "unix:"], "--host-address"),
        (["--extproc-window", "1000"], "--extproc-window"),
        (["--listener-buffer-limit", "10"], "--listener-buffer-limit"),
        (["--host-address", "127.0.0.1:9001", "--host-address", "127.0.0.1:9001"], "127.0.0.1:9001 is given twice"),
        (["--host-address", "unix:/run/h.sock", "--host-address", "host:9001"], "takes no Unix sockets"),
        (["--host-address", "127.0.0.1:9001", "--host-address", "nowhere"], "--host-address: expected HOST:PORT"),
        (["--message-timeout", "0"], "--message-timeout"),
        (["--grpc-client", "google", "--host-address", "a:1", "--host-address", "b:1"], "one --host-address only"),
        (["--grpc-client", "google", "--health-check", "2"], "--health-check configures the extproc cluster"),
    ],
)
def test_bad_options_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], options: list[str], expected: str
) -> None:
    err = refuse(tmp_path, '[routes.default]\nchain = ["passthrough"]\n', capsys, *options)
    assert expected in err
