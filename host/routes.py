"""A route made ready to serve: its plugin chain, each plugin with the settings validated for it.

These are plain values built once at start-up by :mod:`extproc_host.registry`; the serving
core (chain, processor, metrics) reads them without knowing about pluggy or the settings file.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel

from .plugin import Plugin


@dataclass(frozen=True)
class PluginInfo:
    """An installed plugin class and where it came from."""

    name: str
    cls: type[Plugin]
    distribution: str
    version: str
    hooks: tuple[str, ...]


@dataclass(frozen=True)
class ChainLink:
    """One plugin of a route's chain with the settings validated for that route."""

    info: PluginInfo
    settings: BaseModel


@dataclass(frozen=True)
class Route:
    """A settings route made ready to serve: its chain with validated settings."""

    name: str
    chain: tuple[ChainLink, ...]
    failure_policy: str
    path_prefix: str | None = None
