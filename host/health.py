"""The standard gRPC health service (grpc.health.v1.Health) for load balancers and Envoy.

NOT_SERVING until the server has loaded its plugins and started; SERVING for the whole server
("") and for the ext_proc service by name; NOT_SERVING again the moment shutdown starts, so
health checkers take the host out of rotation while in-flight streams finish.

The builtin transport gets :class:`HealthService` (the same Check and Watch as grpcio's
``grpc_health`` servicer, without importing grpc); ``transport = "grpcio"`` gets grpc_health's.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from grpc_health.v1 import health_pb2

from .wire import SERVER_STREAM, UNARY, H2Server, StatusCode

if TYPE_CHECKING:
    import grpc

EXT_PROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
HEALTH_SERVICE = "grpc.health.v1.Health"
SERVICES = ("", EXT_PROC_SERVICE)
Response = health_pb2.HealthCheckResponse


class HealthService:
    """grpc.health.v1.Health on the builtin server: Check answers a service's status (NOT_FOUND
    for a service never set), Watch sends it now and on every change."""

    def __init__(self) -> None:
        self.statuses: dict[str, int] = {"": Response.SERVING}
        self.changed = asyncio.Event()
        self.shutting_down = False

    async def Check(self, request: health_pb2.HealthCheckRequest, context: Any) -> Any:
        status = self.statuses.get(request.service)
        if status is None:
            await context.abort(StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return Response(status=status)

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: Any) -> None:
        last = None
        while True:
            changed = self.changed
            status = self.statuses.get(request.service, Response.SERVICE_UNKNOWN)
            if status != last:
                await context.write(Response(status=status))
                last = status
            await changed.wait()

    async def set(self, service: str, status: int) -> None:
        """Set ``service``'s status (ignored once shutdown started)."""
        if not self.shutting_down:
            self._set(service, status)

    async def enter_graceful_shutdown(self) -> None:
        """NOT_SERVING for every service, for good."""
        for service in self.statuses:
            self._set(service, Response.NOT_SERVING)
        self.shutting_down = True

    def _set(self, service: str, status: int) -> None:
        self.statuses[service] = status
        changed, self.changed = self.changed, asyncio.Event()
        changed.set()  # wakes every watcher; they wait on the new event next


class Health:
    """The health servicer of one server, with the two states the host goes through."""

    def __init__(self, server: grpc.aio.Server | H2Server) -> None:
        self.servicer: Any
        if isinstance(server, H2Server):
            self.servicer = HealthService()
            request = health_pb2.HealthCheckRequest
            server.add_method(f"/{HEALTH_SERVICE}/Check", UNARY, self.servicer.Check, request)
            server.add_method(f"/{HEALTH_SERVICE}/Watch", SERVER_STREAM, self.servicer.Watch, request)
        else:
            from grpc_health.v1 import health, health_pb2_grpc

            self.servicer = health.aio.HealthServicer()
            health_pb2_grpc.add_HealthServicer_to_server(self.servicer, server)

    async def starting(self) -> None:
        """Before the server starts: NOT_SERVING (grpc's servicer starts "" as SERVING)."""
        for service in SERVICES:
            await self.servicer.set(service, Response.NOT_SERVING)

    async def serving(self) -> None:
        """Plugins loaded, server started: report SERVING."""
        for service in SERVICES:
            await self.servicer.set(service, Response.SERVING)

    async def shutting_down(self) -> None:
        """Shutdown started: NOT_SERVING for every service, from now on."""
        await self.servicer.enter_graceful_shutdown()


def check(target: str, service: str = "", timeout: float = 5.0, ca_file: str | None = None) -> str:
    """Ask a running host for its health: ``SERVING``, ``NOT_SERVING``, ... (the status name).

    ``target`` is ``HOST:PORT`` or ``unix:/path``; with ``ca_file`` the channel is TLS and the
    host's certificate is verified against that CA. Raises ``grpc.RpcError`` when the host
    cannot be reached in ``timeout`` seconds.
    """
    import grpc
    from grpc_health.v1 import health_pb2_grpc

    if ca_file is None:
        channel = grpc.insecure_channel(target)
    else:
        with open(ca_file, "rb") as fh:
            channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=fh.read()))
    with channel:
        request = health_pb2.HealthCheckRequest(service=service)
        response = health_pb2_grpc.HealthStub(channel).Check(request, timeout=timeout)
    status: str = Response.ServingStatus.Name(response.status)
    return status


__all__ = ["EXT_PROC_SERVICE", "Health", "HealthService", "check"]
