"""A plugin for the reload tests: it names the settings its chain was built with.

Loaded through ``[server] plugin_modules``; ``tag`` (a setting) goes into ``x-chain-tag`` on
every response, so a client sees which settings served its exchange.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from extproc_host import Headers, Plugin, hookimpl


class TagSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tag: str = "none"


class ChainTag(Plugin[TagSettings]):
    """Adds ``x-chain-tag: <tag>`` to the response headers."""

    name = "chain_tag"
    Settings = TagSettings

    def on_response_headers(self, headers: Headers) -> None:
        headers.set("x-chain-tag", self.settings.tag)


@hookimpl
def register_plugins(register):
    register(ChainTag)
