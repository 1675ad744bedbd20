"""file_tee through a real Envoy with a name template built from request headers: hostile
values cannot place a copy outside the directory, and the copies are still complete."""

from __future__ import annotations

import socket
import time

import pytest

from extproc_host.stack import Stack

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("tee-paths")
    directory = root / "inside" / "tee"
    config = root / "host.toml"
    config.write_text(
        f'[plugins.file_tee]\ndirectory = "{directory}"\n'
        'name = "{authority}-{method}-{stream}-{direction}.body"\n'
        '[routes.full-duplex-streamed]\nchain = ["file_tee"]\n'
        '[routes.default]\nchain = ["passthrough"]\n'
    )
    with Stack("envoy/full_duplex.yaml", config) as running:
        yield running, root, directory


def raw_post(port: int, host: str, method: str, body: bytes) -> bytes:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(
        f"{method} /full-duplex-streamed HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(body)}\r\n"
        f"Connection: close\r\n\r\n".encode()
        + body
    )
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    sock.close()
    return received


@pytest.mark.parametrize(
    "host",
    ["..", "...", "%2e%2e%2f%2e%2e%2fetc", "a..b", "evil.example:8080", "x" * 300],
)
def test_hostile_authority_stays_inside_the_directory(stack, host):
    running, root, directory = stack
    body = b"tee me " * 1000
    answer = raw_post(running.envoy_port, host, "POST", body)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        names = sorted(p.name for p in directory.iterdir()) if directory.exists() else []
        if sum(n.endswith(".body") for n in names) >= 2:
            break
        time.sleep(0.05)
    everything = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix != ".toml")
    assert everything, "no copy written"
    for path in everything:
        assert path.parent == directory, f"{path} is outside {directory}"
        assert not path.name.startswith(".."), path.name
        assert "/" not in path.name and len(path.name) <= 255
    copies = [p for p in everything if p.name.endswith("-request.body")]
    assert len(copies) == 1 and copies[0].read_bytes() == body
    for path in everything:
        path.unlink()
