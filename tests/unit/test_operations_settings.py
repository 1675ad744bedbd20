"""Operations settings: bad values are named (exit 2), a taken metrics port is a clear error
(exit 1), and log lines about a stream carry its id in both log formats."""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import subprocess
import sys
from types import SimpleNamespace

import pytest

from extproc_host.cli import main
from extproc_host.logs import configure, current_stream

ROUTES = "[routes.default]\nchain=['passthrough']\n"


@pytest.mark.parametrize(
    ("server", "expected"),
    [
        ("max_concurrent_streams = -1", ["key 'server.max_concurrent_streams'", "greater than or equal to 0"]),
        ("grace_seconds = -5", ["key 'server.grace_seconds'", "greater than or equal to 0"]),
        ("max_message_bytes = 1000", ["key 'server.max_message_bytes'", "greater than or equal to 4194304"]),
        ("metrics_listen = 'nowhere'", ["key 'server.metrics_listen'", "HOST:PORT"]),
        ("log_format = 'xml'", ["key 'server.log_format'", "'text' or 'json'"]),
        ("stream_window_bytes = 1000", ["key 'server.stream_window_bytes'", "at least 65535"]),
    ],
)
def test_bad_operations_settings_are_named(tmp_path, capsys, server, expected):
    path = tmp_path / "bad.toml"
    path.write_text(f"[server]\n{server}\n{ROUTES}")
    assert main(["check", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "bad.toml" in err and "Traceback" not in err
    for fragment in expected:
        assert fragment in err, err


def test_metrics_port_in_use_exits_1_naming_it(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = tmp_path / "host.toml"
        path.write_text(f"[server]\nmetrics_listen = '127.0.0.1:{port}'\n{ROUTES}")
        proc = subprocess.run(
            [sys.executable, "-m", "extproc_host", "--config", str(path), "--listen", "127.0.0.1:0"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert proc.returncode == 1, proc.stderr
    assert f"cannot serve metrics on 127.0.0.1:{port}" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_log_lines_about_a_stream_carry_its_id(fmt):
    out = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        configure("info", fmt, out)
        token = current_stream.set(SimpleNamespace(stream_id="42", route_name="upload"))
        logging.getLogger("some.plugin").warning("inside")
        current_stream.reset(token)
        logging.getLogger("extproc_host.server").info("outside")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    inside, outside = out.getvalue().splitlines()
    if fmt == "json":
        inside, outside = json.loads(inside), json.loads(outside)
        assert (inside["message"], inside["stream_id"], inside["route"], inside["level"]) == (
            "inside",
            "42",
            "upload",
            "WARNING",
        )
        assert (outside["message"], outside["stream_id"]) == ("outside", None)
        # Stream ids count per process: with --workers only the process tells two stream 17s apart.
        assert inside["process"] == outside["process"] == os.getpid()
    else:
        assert inside.endswith("WARNING some.plugin: inside [stream=42 route=upload]")
        assert outside.endswith("INFO extproc_host.server: outside")


@pytest.mark.parametrize(("window", "expected"), [(None, 1024 * 1024), (65535, 65535), (0, None)])
def test_stream_window_sets_grpc_flow_control(window, expected):
    from extproc_host.server import server_options
    from extproc_host.settings import Settings

    server = {} if window is None else {"stream_window_bytes": window}
    options = dict(server_options(Settings(server=server)))
    if expected is None:  # gRPC's automatic window: BDP probing left on
        assert "grpc.http2.bdp_probe" not in options and "grpc.http2.lookahead_bytes" not in options
    else:
        assert options["grpc.http2.bdp_probe"] == 0
        assert options["grpc.http2.lookahead_bytes"] == expected
