"""Where the gRPC server listens: ``HOST:PORT`` or ``unix:/path/to.sock``, plain or TLS.

    [server]
    listen = "unix:/run/extproc/host.sock"     # or "0.0.0.0:9001"

    [server.tls]                               # optional: TLS, and with client_ca_file mutual TLS
    cert_file = "/etc/extproc/tls.crt"
    key_file = "/etc/extproc/tls.key"
    client_ca_file = "/etc/extproc/envoy-ca.crt"

A Unix socket file left behind by a dead server is removed before binding; one a live server
still answers on is refused. The socket file is removed again when the server stops or the
process exits.
"""

from __future__ import annotations

import atexit
import ipaddress
import os
import socket
import ssl
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from .wire import H2Server

if TYPE_CHECKING:  # grpc is imported only with transport = "grpcio"
    import grpc

UNIX_PREFIX = "unix:"
# sun_path holds 108 bytes on Linux, the terminating NUL included.
_MAX_SOCKET_PATH = 107


@dataclass(frozen=True)
class ListenAddress:
    """A parsed ``listen`` value: a TCP host and port, or a Unix socket path."""

    host: str = ""
    port: int = 0
    path: str | None = None

    @property
    def is_unix(self) -> bool:
        return self.path is not None

    def target(self) -> str:
        """The address in gRPC's notation (``[::1]:9001``, ``unix:/abs/path``)."""
        if self.path is not None:
            return UNIX_PREFIX + self.path
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def with_port(self, port: int) -> ListenAddress:
        return ListenAddress(self.host, port, self.path)

    def reachable(self) -> ListenAddress:
        """Where a client on this machine connects: a server listening on every interface
        (``0.0.0.0``, ``::``) is reached on loopback; any other address is itself."""
        if self.path is None:
            try:
                ip = ipaddress.ip_address(self.host)
            except ValueError:
                return self
            if ip.is_unspecified:
                return ListenAddress("::1" if ip.version == 6 else "127.0.0.1", self.port)
        return self


def split_host_port(value: str) -> tuple[str, int] | None:
    """``HOST:PORT`` (``[::1]:9001`` for IPv6) as (host, port), or None when it is not one."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        return None
    return host.strip("[]"), int(port)


def parse_address(value: str) -> ListenAddress:
    """``HOST:PORT`` (``[::1]:9001`` for IPv6) or ``unix:PATH``; ValueError when neither."""
    if value.startswith(UNIX_PREFIX):
        path = value[len(UNIX_PREFIX) :]
        if path.startswith("//"):  # unix:///abs/path, gRPC's other spelling
            path = path[2:]
        if not path:
            raise ValueError(f"expected unix:/path/to.sock, got {value!r}")
        path = os.path.abspath(path)
        if len(os.fsencode(path)) > _MAX_SOCKET_PATH:
            raise ValueError(f"Unix socket path is longer than {_MAX_SOCKET_PATH} bytes: {path}")
        return ListenAddress(path=path)
    found = split_host_port(value)
    if found is None:
        raise ValueError(f"expected HOST:PORT or unix:/path/to.sock, got {value!r}")
    return ListenAddress(host=found[0], port=found[1])


def _readable_file(value: str) -> str:
    path = Path(value)
    if not path.is_file():
        raise ValueError(f"file not found: {value}")
    if not os.access(path, os.R_OK):
        raise ValueError(f"file not readable: {value}")
    return value


class TlsSettings(BaseModel):
    """``[server.tls]``: the server's certificate and key (PEM); with ``client_ca_file``, Envoy
    must present a client certificate signed by that CA (mutual TLS)."""

    model_config = ConfigDict(extra="forbid")

    cert_file: str
    key_file: str
    client_ca_file: str | None = None

    _check_files = field_validator("cert_file", "key_file", "client_ca_file")(
        lambda value: value if value is None else _readable_file(value)
    )

    @model_validator(mode="after")
    def _check_pem(self) -> TlsSettings:
        # The ssl module parses the same PEM files: a bad key or a key of another
        # certificate is a settings error at start-up, not a failed handshake later.
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(self.cert_file, self.key_file)
        except (ssl.SSLError, OSError) as exc:
            raise ValueError(f"cert_file and key_file are not a matching PEM certificate and key: {exc}") from None
        if self.client_ca_file is not None:
            try:
                context.load_verify_locations(cafile=self.client_ca_file)
            except (ssl.SSLError, OSError) as exc:
                raise ValueError(f"client_ca_file is not a PEM certificate: {exc}") from None
        return self

    def ssl_context(self) -> ssl.SSLContext:
        """The builtin server's TLS context: HTTP/2 by ALPN; client certificates required when a
        client CA is set."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert_file, self.key_file)
        context.set_alpn_protocols(["h2"])
        if self.client_ca_file is not None:
            context.load_verify_locations(cafile=self.client_ca_file)
            context.verify_mode = ssl.CERT_REQUIRED
        return context

    def credentials(self) -> grpc.ServerCredentials:
        """gRPC server credentials; client certificates required when a client CA is set."""
        import grpc

        ca = Path(self.client_ca_file).read_bytes() if self.client_ca_file else None
        pair = (Path(self.key_file).read_bytes(), Path(self.cert_file).read_bytes())
        return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=ca is not None)


def _claim_socket_path(path: str) -> None:
    """Remove a stale socket file at ``path``; OSError if a live server owns it or it is not a socket."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(f"cannot listen on unix:{path}: the file exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)  # left by a server that died: nobody accepts on it
        return
    except OSError as exc:
        raise OSError(f"cannot listen on unix:{path}: cannot tell whether a server owns it ({exc})") from None
    finally:
        probe.close()
    raise OSError(f"cannot listen on unix:{path}: another server is listening on it")


class Listener:
    """Starts a gRPC server (builtin or grpc.aio) on a :class:`ListenAddress` and cleans up after it."""

    def __init__(self, address: ListenAddress, tls: TlsSettings | None = None) -> None:
        self.address = address
        self.tls = tls
        self._socket_inode: int | None = None

    async def start(self, server: grpc.aio.Server | H2Server, *, reuse_port: bool = False) -> str:
        """Start ``server`` listening here; returns the bound address to announce (the real
        port for port 0). OSError when it cannot be bound. ``reuse_port`` is for the builtin
        server (grpc.aio takes it as a server option)."""
        shown = self.address.target()
        path = self.address.path
        if path is not None:
            _claim_socket_path(path)
        if isinstance(server, H2Server):
            context = self.tls.ssl_context() if self.tls is not None else None
            try:
                bound = await server.listen(
                    self.address.host or None, self.address.port, path=path, ssl_context=context, reuse_port=reuse_port
                )
            except OSError as exc:
                raise OSError(f"cannot listen on {shown}: {exc.strerror or exc}") from None
        else:
            try:
                if self.tls is not None:
                    bound = server.add_secure_port(shown, self.tls.credentials())
                else:
                    bound = server.add_insecure_port(shown)
            except RuntimeError as exc:
                raise OSError(f"cannot listen on {shown}: {exc}") from None
            if bound == 0:
                raise OSError(f"cannot listen on {shown} (address in use or not available)")
            await server.start()
        if path is not None:
            # Removed when the server stops (grpc.aio) and at exit, whichever way it comes.
            self._socket_inode = os.lstat(path).st_ino
            atexit.register(self.close)
            return shown
        return self.address.with_port(bound).target()

    def close(self) -> None:
        """Remove the Unix socket file this listener created (if it is still that file)."""
        path = self.address.path
        if self._socket_inode is None or path is None:
            return
        try:
            if os.lstat(path).st_ino == self._socket_inode:
                os.unlink(path)
        except FileNotFoundError:
            pass
        self._socket_inode = None
