"""The host's listeners behind a real Envoy: a Unix domain socket, TLS, and mutual TLS.

Each test runs Envoy, the host and the echo upstream, with Envoy's ``extproc`` cluster using
the transport under test, and checks that a body comes back byte for byte through the host
(a plugin on the route stamps the response, so a bypassed host would be noticed). Certificates
come from trustme: a throwaway CA, a server certificate for the host, a client one for Envoy.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
import trustme
from e2e_clients import KiB, h1_request

from extproc_host.stack import Stack, extproc_host_command

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
PYTHONPATH = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
SERVER_NAME = "extproc.test"

ROUTES = """
[routes.full-duplex-streamed]
chain = ["worker_pid"]

[routes.default]
chain = ["worker_pid"]
"""


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: a Unix socket path must fit in 107 bytes."""
    with tempfile.TemporaryDirectory(prefix="xp-", dir="/tmp") as directory:
        yield Path(directory)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """PEM files: the CA, the host's certificate and key, Envoy's client certificate and key,
    and a second CA that signed none of them."""
    directory = tmp_path_factory.mktemp("pki")
    ca, other_ca = trustme.CA(), trustme.CA()
    server = ca.issue_cert(SERVER_NAME)
    client = ca.issue_cert("envoy.test")
    files = {
        "ca": ca.cert_pem,
        "other_ca": other_ca.cert_pem,
        "server_cert": server.cert_chain_pems[0],
        "server_key": server.private_key_pem,
        "client_cert": client.cert_chain_pems[0],
        "client_key": client.private_key_pem,
    }
    paths = {}
    for name, blob in files.items():
        paths[name] = directory / f"{name}.pem"
        blob.write_to_path(str(paths[name]))
    return paths


def host_config(directory: Path, tls: str = "") -> Path:
    config = directory / "host.toml"
    config.write_text(
        f'[server]\nplugin_modules = ["tests.e2e.worker_plugins"]\nlog_level = "warning"\n{tls}\n{ROUTES}'
    )
    return config


def tls_settings(pki: dict[str, Path], mutual: bool) -> str:
    text = f'[server.tls]\ncert_file = "{pki["server_cert"]}"\nkey_file = "{pki["server_key"]}"\n'
    if mutual:
        text += f'client_ca_file = "{pki["ca"]}"\n'
    return text


def envoy_tls(ca: Path, client: tuple[Path, Path] | None = None) -> Callable[[dict], None]:
    """An ``envoy_edit`` that makes the ``extproc`` cluster speak TLS, verifying the host's
    certificate against ``ca`` and its name, and presenting ``client`` (cert, key) if given."""

    def edit(config: dict) -> None:
        common: dict = {
            "alpn_protocols": ["h2"],
            "validation_context": {
                "trusted_ca": {"filename": str(ca)},
                "match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": SERVER_NAME}}],
            },
        }
        if client is not None:
            common["tls_certificates"] = [
                {"certificate_chain": {"filename": str(client[0])}, "private_key": {"filename": str(client[1])}}
            ]
        for cluster in config["static_resources"]["clusters"]:
            if cluster["name"] == "extproc":
                cluster["transport_socket"] = {
                    "name": "envoy.transport_sockets.tls",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                        "sni": SERVER_NAME,
                        "common_tls_context": common,
                    },
                }

    return edit


def host_stack(directory: Path, tls: str = "", **stack_args) -> Stack:
    """Envoy (envoy/full_duplex.yaml), echo, and the host with the ``worker_pid`` test plugin
    and ``tls`` settings; ``stack_args`` go to Stack (host_listen, envoy_edit, host_args)."""
    return Stack(
        "envoy/full_duplex.yaml",
        host_config=host_config(directory, tls),
        host_env={"PYTHONPATH": PYTHONPATH},
        **stack_args,
    )


def envoy_client(pki: dict[str, Path]) -> tuple[Path, Path]:
    """Envoy's client certificate and key, signed by the host's CA."""
    return pki["client_cert"], pki["client_key"]


def roundtrip(stack: Stack, body) -> None:
    """A body through the full-duplex route: 200, byte-exact, stamped by the host's plugin."""
    echoed = asyncio.run(h1_request(stack.url + "/full-duplex-streamed", body=body))
    assert echoed.status == 200, stack.log_tails()
    assert (echoed.size, echoed.sha256) == (body.size, body.sha256)
    assert echoed.headers.get("x-worker-pid") == str(stack.pids["host"])


def refused(stack: Stack, body) -> int:
    """Status of a request whose ext_proc stream cannot be opened (failure_mode_allow is off)."""
    return asyncio.run(h1_request(stack.url + "/full-duplex-streamed", body=body)).status


def test_unix_socket(short_dir: Path, payload) -> None:
    sock = short_dir / "host.sock"
    body = payload(256 * KiB)
    with host_stack(short_dir, host_listen=f"unix:{sock}") as stack:
        assert stack.host_socket == str(sock)
        assert sock.is_socket()
        roundtrip(stack, body)
        assert stack.envoy_stats(r"cluster\.extproc\.upstream_cx_total")["cluster.extproc.upstream_cx_total"] >= 1
    assert not sock.exists()  # removed when the host stopped


def test_unix_socket_left_by_a_dead_server_is_replaced(short_dir: Path, payload) -> None:
    sock = short_dir / "host.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(sock))
    stale.close()  # the file stays, nobody listens
    assert sock.is_socket()
    with host_stack(short_dir, host_listen=f"unix:{sock}") as stack:
        roundtrip(stack, payload(1 * KiB))


def test_unix_socket_of_a_live_server_is_refused(short_dir: Path) -> None:
    sock = short_dir / "host.sock"
    live = socket.socket(socket.AF_UNIX)
    live.bind(str(sock))
    live.listen()
    try:
        result = subprocess.run(
            [*extproc_host_command(), "--listen", f"unix:{sock}"], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 1
        assert f"cannot listen on unix:{sock}: another server is listening on it" in result.stderr
        assert sock.is_socket()  # left alone
    finally:
        live.close()


def test_unix_socket_path_that_is_not_a_socket_is_refused(short_dir: Path) -> None:
    path = short_dir / "regular-file"
    path.write_text("keep me")
    result = subprocess.run(
        [*extproc_host_command(), "--listen", f"unix:{path}"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1
    assert "exists and is not a socket" in result.stderr
    assert path.read_text() == "keep me"


def test_tls(tmp_path: Path, pki: dict[str, Path], payload) -> None:
    with host_stack(tmp_path, tls_settings(pki, mutual=False), envoy_edit=envoy_tls(pki["ca"])) as stack:
        roundtrip(stack, payload(256 * KiB))
        stats = stack.envoy_stats(r"cluster\.extproc\.ssl\.handshake")
        assert stats["cluster.extproc.ssl.handshake"] >= 1


def test_tls_host_is_refused_by_an_envoy_trusting_another_ca(tmp_path: Path, pki: dict[str, Path], payload) -> None:
    with host_stack(tmp_path, tls_settings(pki, mutual=False), envoy_edit=envoy_tls(pki["other_ca"])) as stack:
        assert refused(stack, payload(1 * KiB)) == 500
        stats = stack.envoy_stats(r"cluster\.extproc\.ssl\.")
        assert stats.get("cluster.extproc.ssl.fail_verify_error", 0) >= 1


def test_mutual_tls(tmp_path: Path, pki: dict[str, Path], payload) -> None:
    edit = envoy_tls(pki["ca"], client=envoy_client(pki))
    with host_stack(tmp_path, tls_settings(pki, mutual=True), envoy_edit=edit) as stack:
        roundtrip(stack, payload(256 * KiB))
        assert stack.envoy_stats(r"cluster\.extproc\.ssl\.handshake")["cluster.extproc.ssl.handshake"] >= 1


def test_mutual_tls_refuses_an_envoy_without_a_client_certificate(
    tmp_path: Path, pki: dict[str, Path], payload
) -> None:
    with host_stack(tmp_path, tls_settings(pki, mutual=True), envoy_edit=envoy_tls(pki["ca"])) as stack:
        assert refused(stack, payload(1 * KiB)) == 500


def test_mutual_tls_refuses_a_client_certificate_from_another_ca(tmp_path: Path, pki: dict[str, Path], payload) -> None:
    other = trustme.CA().issue_cert("envoy.test")
    cert, key = tmp_path / "other-client.pem", tmp_path / "other-client.key"
    other.cert_chain_pems[0].write_to_path(str(cert))
    other.private_key_pem.write_to_path(str(key))
    with host_stack(
        tmp_path, tls_settings(pki, mutual=True), envoy_edit=envoy_tls(pki["ca"], client=(cert, key))
    ) as stack:
        assert refused(stack, payload(1 * KiB)) == 500


def test_bad_tls_settings_stop_the_host_with_status_2(tmp_path: Path, pki: dict[str, Path]) -> None:
    config = tmp_path / "host.toml"
    config.write_text(f'[server.tls]\ncert_file = "{pki["server_cert"]}"\nkey_file = "{tmp_path}/missing.key"\n')
    result = subprocess.run(
        [*extproc_host_command(), "--config", str(config)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert f"{config}: key 'server.tls.key_file'" in result.stderr
    assert "missing.key" in result.stderr


def test_mutual_tls_on_a_unix_socket(short_dir: Path, pki: dict[str, Path], payload) -> None:
    mutual = tls_settings(pki, mutual=True)
    edit = envoy_tls(pki["ca"], client=envoy_client(pki))
    with host_stack(short_dir, mutual, host_listen=f"unix:{short_dir}/tls.sock", envoy_edit=edit) as stack:
        roundtrip(stack, payload(64 * KiB))
        assert stack.envoy_stats(r"cluster\.extproc\.ssl\.handshake")["cluster.extproc.ssl.handshake"] >= 1


def test_mutual_tls_with_two_workers(tmp_path: Path, pki: dict[str, Path], payload) -> None:
    body = payload(64 * KiB)
    mutual = tls_settings(pki, mutual=True)
    edit = envoy_tls(pki["ca"], client=envoy_client(pki))
    with host_stack(tmp_path, mutual, host_args=["--workers", "2"], envoy_edit=edit) as stack:
        workers = {str(child.pid) for child in psutil.Process(stack.pids["host"]).children()}
        echoed = asyncio.run(h1_request(stack.url + "/full-duplex-streamed", body=body))
        assert echoed.status == 200 and (echoed.size, echoed.sha256) == (body.size, body.sha256)
        assert echoed.headers.get("x-worker-pid") in workers
