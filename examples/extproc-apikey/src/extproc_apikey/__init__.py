"""apikey: authenticates requests by API key and tells Envoy who called.

The key comes in ``authorization: Bearer <key>`` (or the header the settings name). A known
key lets the request through with ``x-user: <user>`` and without the key (the upstream never
sees it); a missing or unknown one gets a 401, which a gRPC client receives as
``UNAUTHENTICATED``. Either way the verdict goes to Envoy's dynamic metadata, namespace
``extproc.auth``: Envoy's access log prints it, and a rate limit or RBAC filter after ext_proc
can use it.

    [routes.default]
    chain = ["apikey"]

    [plugins.apikey]
    keys = { "k-7d1f" = "alice", "k-90ab" = "bob" }   # key -> user
    header = "authorization"                         # "Bearer <key>"; another header holds the key alone
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from extproc_host import Headers, Needs, Plugin, Reject, hookimpl

#: Where the verdict goes in Envoy's dynamic metadata.
NAMESPACE = "extproc.auth"


class ApiKeySettings(BaseModel):
    """``[plugins.apikey]``, validated by the host at start-up."""

    model_config = ConfigDict(extra="forbid")

    keys: dict[str, str] = Field(default_factory=dict)
    header: str = "authorization"


class ApiKey(Plugin[ApiKeySettings]):
    """One instance per HTTP exchange: checks the key in the request headers."""

    name = "apikey"
    Settings = ApiKeySettings
    # Request headers only; its verdict goes to Envoy as metadata in its namespace.
    needs = Needs(request_headers=True, writes_metadata=[NAMESPACE])

    def on_request_headers(self, headers: Headers) -> None:
        key = self._key(headers)
        user = self.settings.keys.get(key) if key else None
        if user is None:
            reason = "no API key" if not key else "unknown API key"
            self.stream.set_metadata(NAMESPACE, {"authenticated": False, "reason": reason})
            raise Reject(
                401,
                f"{reason}\n",
                {"www-authenticate": "Bearer"},
                grpc_status="UNAUTHENTICATED",
                details=f"apikey: {reason}",
            )
        self.stream.set_metadata(NAMESPACE, {"authenticated": True, "user": user})
        headers.remove(self.settings.header)
        headers.set("x-user", user)

    def _key(self, headers: Headers) -> str | None:
        value = headers.get(self.settings.header)
        if value is None:
            return None
        if self.settings.header == "authorization":
            scheme, _, token = value.partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
        return value.strip()


@hookimpl
def register_plugins(register) -> None:
    register(ApiKey)
