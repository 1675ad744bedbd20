"""canary: sends a steady share of users to a canary upstream.

The user comes from a request header (``x-user`` by default, as ``apikey`` sets it). A user
named in ``users``, or one whose hash falls in the first ``percent`` of a hundred buckets,
gets ``x-upstream: canary`` and Envoy picks the route again: the route that matches that
header forwards to the canary upstream. The same user always lands on the same side. A client
cannot choose for itself: an ``x-upstream`` it sent is removed first.

    [routes.default]
    chain = ["canary"]

    [routes.canary]                         # what Envoy picks for x-upstream: canary
    chain = ["canary"]
    match_headers = { "x-upstream" = "canary" }
    upstream = "canary"                     # envoy-config --upstream canary=HOST:PORT

    [plugins.canary]
    header = "x-user"
    percent = 10
    users = ["alice"]                       # always on the canary
"""

from __future__ import annotations

import hashlib

from pydantic import BaseModel, ConfigDict, Field

from extproc_host import Headers, Needs, Plugin, hookimpl

#: The header Envoy's canary route matches on.
ROUTE_HEADER = "x-upstream"


class CanarySettings(BaseModel):
    """``[plugins.canary]``, validated by the host at start-up."""

    model_config = ConfigDict(extra="forbid")

    header: str = "x-user"
    percent: int = Field(default=10, ge=0, le=100)
    users: list[str] = Field(default_factory=list)
    upstream: str = "canary"


def bucket(user: str) -> int:
    """The user's bucket, 0 to 99, the same on every host."""
    return int.from_bytes(hashlib.sha256(user.encode()).digest()[:4], "big") % 100


class Canary(Plugin[CanarySettings]):
    """One instance per HTTP exchange: picks the side in the request headers."""

    name = "canary"
    Settings = CanarySettings
    # It changes a header Envoy's routes match on: Envoy must pick the route again.
    needs = Needs(request_headers=True, reroutes=True)

    def on_request_headers(self, headers: Headers) -> None:
        headers.remove(ROUTE_HEADER)
        user = headers.get(self.settings.header)
        if user is not None and (user in self.settings.users or bucket(user) < self.settings.percent):
            headers.set(ROUTE_HEADER, self.settings.upstream)


@hookimpl
def register_plugins(register) -> None:
    register(Canary)
