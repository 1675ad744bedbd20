"""The builtin server against every client setting of Envoy that changes what it sees: both of
Envoy's gRPC clients (``envoy_grpc``, Envoy's own HTTP/2 codec through the ``extproc`` cluster,
and ``google_grpc``, gRPC's C++ core, generated with ``envoy-config --grpc-client google``), and
the ``http2_protocol_options`` of the ``extproc`` cluster that change the wire: an HPACK table of
0 (the host must start its next header block with a table size update), one stream per
connection (Envoy opens one per exchange), and stream windows of 64 KiB and 16 MiB.

In each, 70 MiB bodies go through FULL_DUPLEX_STREAMED, STREAMED and BUFFERED at once and come
back byte for byte.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from e2e_clients import MiB, h1_request

from extproc_host.stack import Stack

pytestmark = pytest.mark.e2e

HOST_CONFIG = """\
[server]
log_level = "warning"
[routes.default]
chain = ["passthrough"]
body_mode = "FULL_DUPLEX_STREAMED"
[routes.streamed]
chain = ["passthrough"]
path_prefix = "/streamed"
body_mode = "STREAMED"
[routes.buffered]
chain = ["passthrough"]
path_prefix = "/buffered"
body_mode = "BUFFERED"
buffer_limit_bytes = 100663296
"""
PATHS = {"full-duplex": "/anything", "streamed": "/streamed/x", "buffered": "/buffered/x"}


def cluster_http2(**options: Any) -> Callable[[dict[str, Any]], None]:
    """An envoy_edit that sets ``http2_protocol_options`` of the ``extproc`` cluster."""

    def edit(config: dict[str, Any]) -> None:
        for cluster in config["static_resources"]["clusters"]:
            if cluster["name"] == "extproc":
                http = next(iter(cluster["typed_extension_protocol_options"].values()))
                http["explicit_http_config"]["http2_protocol_options"].update(options)

    return edit


CLIENTS: dict[str, dict[str, Any]] = {
    "envoy_grpc": {},
    "google_grpc": {"envoy_config_args": ["--grpc-client", "google"]},
    "hpack_table_size-0": {"envoy_edit": cluster_http2(hpack_table_size=0)},
    "max_concurrent_streams-1": {"envoy_edit": cluster_http2(max_concurrent_streams=1)},
    "windows-64KiB": {
        "envoy_edit": cluster_http2(initial_stream_window_size=65536, initial_connection_window_size=65536)
    },
    "windows-16MiB": {
        "envoy_edit": cluster_http2(initial_stream_window_size=16 * MiB, initial_connection_window_size=16 * MiB)
    },
}


@pytest.mark.parametrize("client", CLIENTS)
async def test_70_mib_bodies_in_every_mode_come_back_whole(tmp_path, payload, client: str) -> None:
    config = tmp_path / "host.toml"
    config.write_text(HOST_CONFIG)
    body = payload(70 * MiB)
    with Stack(None, config, **CLIENTS[client]) as stack:
        echoed = await asyncio.gather(*(h1_request(stack.url + path, body=body) for path in PATHS.values()))
        for mode, result in zip(PATHS, echoed, strict=True):
            assert result.status == 200, f"{client} {mode}: status {result.status}"
            assert (result.size, result.sha256) == (body.size, body.sha256), f"{client} {mode}: other bytes back"
        stats = stack.envoy_stats("ext_proc")
        assert not any(v for k, v in stats.items() if "failed" in k or "error" in k), stats
        assert stats["http.ingress.ext_proc.streams_started"] == 3
        assert stats["http.ingress.ext_proc.stream_msgs_received"] > 3 * 70  # 1 MiB chunks, answered
        google = stack.envoy_stats("grpc.extproc.streams_total").get("grpc.extproc.streams_total", 0)
        assert google == (3 if client == "google_grpc" else 0), "the ext_proc streams went through another client"
        if client == "max_concurrent_streams-1":
            connections = stack.envoy_stats("cluster.extproc.upstream_cx_total")["cluster.extproc.upstream_cx_total"]
            assert connections >= 3, "three exchanges at once on one-stream connections need three connections"
