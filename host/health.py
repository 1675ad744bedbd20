"""The standard gRPC health service (grpc.health.v1.Health) for load balancers and Envoy.

NOT_SERVING until the server has loaded its plugins and started; SERVING for the whole server
("") and for the ext_proc service by name; NOT_SERVING again the moment shutdown starts, so
health checkers take the host out of rotation while in-flight streams finish.
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from .h2server import SERVER_STREAM, UNARY, H2Server

EXT_PROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
HEALTH_SERVICE = "grpc.health.v1.Health"
SERVICES = ("", EXT_PROC_SERVICE)


class Health:
    """The health servicer of one server, with the two states the host goes through."""

    def __init__(self, server: grpc.aio.Server | H2Server) -> None:
        self.servicer = health.aio.HealthServicer()
        if isinstance(server, H2Server):
            request = health_pb2.HealthCheckRequest
            server.add_method(f"/{HEALTH_SERVICE}/Check", UNARY, self.servicer.Check, request)
            server.add_method(f"/{HEALTH_SERVICE}/Watch", SERVER_STREAM, self.servicer.Watch, request)
        else:
            health_pb2_grpc.add_HealthServicer_to_server(self.servicer, server)

    async def starting(self) -> None:
        """Before the server starts: NOT_SERVING (grpc's servicer starts "" as SERVING)."""
        for service in SERVICES:
            await self.servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)

    async def serving(self) -> None:
        """Plugins loaded, server started: report SERVING."""
        for service in SERVICES:
            await self.servicer.set(service, health_pb2.HealthCheckResponse.SERVING)

    async def shutting_down(self) -> None:
        """Shutdown started: NOT_SERVING for every service, from now on."""
        await self.servicer.enter_graceful_shutdown()


def check(target: str, service: str = "", timeout: float = 5.0, ca_file: str | None = None) -> str:
    """Ask a running host for its health: ``SERVING``, ``NOT_SERVING``, ... (the status name).

    ``target`` is ``HOST:PORT`` or ``unix:/path``; with ``ca_file`` the channel is TLS and the
    host's certificate is verified against that CA. Raises ``grpc.RpcError`` when the host
    cannot be reached in ``timeout`` seconds.
    """
    if ca_file is None:
        channel = grpc.insecure_channel(target)
    else:
        with open(ca_file, "rb") as fh:
            channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=fh.read()))
    with channel:
        request = health_pb2.HealthCheckRequest(service=service)
        response = health_pb2_grpc.HealthStub(channel).Check(request, timeout=timeout)
    status: str = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    return status
