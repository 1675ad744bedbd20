"""Request trailers through a real Envoy: an HTTP/2 client sends headers, body and trailers.

In FULL_DUPLEX_STREAMED the trailers are what tells the host the body is complete (no chunk
carries end_of_stream), so this checks the host ends the body there, answers the trailers,
and the whole body still reaches the upstream and comes back byte for byte.
"""

from __future__ import annotations

import hashlib
import socket

import h2.config
import h2.connection
import h2.events
import pytest

from extproc_host.stack import Stack

pytestmark = pytest.mark.e2e

HOST_CONFIG = """
[server]
plugin_modules = ["tests.unit.sample_plugins"]

[routes.full-duplex-streamed]
chain = ["passthrough"]

[routes.streamed]
chain = ["passthrough"]

[routes.buffered]
chain = ["passthrough"]

[routes.default]
chain = ["upper"]
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    config = tmp_path_factory.mktemp("trailers") / "host.toml"
    config.write_text(HOST_CONFIG)
    with Stack("envoy/full_duplex.yaml", config, host_env={"PYTHONPATH": str(root)}) as s:
        yield s


def h2_post_with_trailers(port: int, path: str, body: bytes, trailers: list[tuple[str, str]]) -> tuple[int, bytes]:
    """POST over h2c with request trailers; returns (status, response body)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    sid = conn.get_next_available_stream_id()
    conn.send_headers(
        sid,
        [(":method", "POST"), (":path", path), (":scheme", "http"), (":authority", "localhost"), ("te", "trailers")],
    )
    frame = conn.max_outbound_frame_size
    for offset in range(0, len(body), frame):  # bodies here stay inside the initial window
        conn.send_data(sid, body[offset : offset + frame])
    conn.send_headers(sid, trailers, end_stream=True)
    sock.sendall(conn.data_to_send())
    status, received, done = 0, bytearray(), False
    while not done:
        data = sock.recv(65536)
        if not data:
            break
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived):
                status = int(dict(event.headers)[":status"])
            elif isinstance(event, h2.events.DataReceived):
                received += event.data
                conn.acknowledge_received_data(event.flow_controlled_length, sid)
            elif isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)):
                done = True
        sock.sendall(conn.data_to_send())
    sock.close()
    return status, bytes(received)


BODY = bytes(range(256)) * 160  # 40 KiB


@pytest.mark.parametrize("path", ["/full-duplex-streamed", "/streamed", "/buffered"])
def test_body_with_trailers_comes_back_whole(stack, path):
    status, received = h2_post_with_trailers(stack.envoy_port, path, BODY, [("x-checksum", "abc")])
    assert status == 200
    assert hashlib.sha256(received).hexdigest() == hashlib.sha256(BODY).hexdigest()


def test_transform_with_trailers_in_full_duplex(stack):
    body = b"trailers end this body " * 1000
    status, received = h2_post_with_trailers(stack.envoy_port, "/", body, [("x-checksum", "abc")])
    assert status == 200
    # upper-cased on the way up and again on the way back
    assert received == body.upper()
