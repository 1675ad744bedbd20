"""The plugin registry: one pluggy PluginManager, the plugins it found, their settings per route.

Built-in and third-party plugins arrive the same way: through the ``extproc_host.plugins``
entry-point group, loaded by pluggy. Each module registers its plugin classes through the
``register_plugins`` hook. Set ``EXTPROC_TRACE_HOOKS=1`` to log every pluggy hook call.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pluggy
from pluggy import HookImpl
from pydantic import ValidationError

from . import hookspecs
from .errors import ConfigError
from .plugin import Plugin, overridden_hooks
from .routes import ChainLink, PluginInfo, Route
from .settings import Settings, describe_validation_error, load_settings

ENTRY_POINT_GROUP = "extproc_host.plugins"

log = logging.getLogger("extproc_host.registry")


def make_plugin_manager(
    load_entry_points: bool = True, modules: list[str] | None = None, source: str = "settings"
) -> pluggy.PluginManager:
    """The one PluginManager: hookspecs added, entry points and ``modules`` loaded, tracing if asked for."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    if load_entry_points:
        pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    for index, name in enumerate(modules or ()):
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            raise ConfigError(
                f"{source}: key 'server.plugin_modules[{index}]': cannot import '{name}': {exc}"
            ) from None
        if pm.is_registered(module):
            continue
        pm.register(module, name=name)
    if os.environ.get("EXTPROC_TRACE_HOOKS"):
        trace = logging.getLogger("extproc_host.hooks")

        def before(hook_name: str, hook_impls: Sequence[HookImpl], kwargs: Mapping[str, Any]) -> None:
            trace.info("hook %s(%s) -> %s", hook_name, ", ".join(kwargs), [i.plugin_name for i in hook_impls])

        def after(
            outcome: pluggy.Result[Any], hook_name: str, hook_impls: Sequence[HookImpl], kwargs: Mapping[str, Any]
        ) -> None:
            trace.info("hook %s done", hook_name)

        pm.add_hookcall_monitoring(before, after)
    return pm


def _distributions(pm: pluggy.PluginManager) -> dict[int, tuple[str, str]]:
    """Module id -> (distribution name, version) for everything loaded from entry points."""
    out: dict[int, tuple[str, str]] = {}
    for module, dist in pm.list_plugin_distinfo():
        out[id(module)] = (dist.metadata["Name"], dist.version)
    return out


def discover(pm: pluggy.PluginManager) -> dict[str, PluginInfo]:
    """Every plugin class registered through ``register_plugins``, by name."""
    dists = _distributions(pm)
    found: dict[str, PluginInfo] = {}
    for impl in pm.hook.register_plugins.get_hookimpls():
        dist, version = dists.get(id(impl.plugin), ("(not installed)", ""))

        def register(cls: type[Plugin], _dist: str = dist, _version: str = version) -> None:
            if not (isinstance(cls, type) and issubclass(cls, Plugin)) or not cls.name:
                raise TypeError(f"{cls!r} is not a Plugin subclass with a name")
            if cls.name in found and found[cls.name].cls is not cls:
                other = found[cls.name]
                raise ConfigError(
                    f"plugin name '{cls.name}' is registered twice: by {other.distribution} and by {_dist}"
                )
            found[cls.name] = PluginInfo(cls.name, cls, _dist, _version, tuple(overridden_hooks(cls)))

        impl.function(register=register)
    return dict(sorted(found.items()))


def build_routes(settings: Settings, plugins: dict[str, PluginInfo], source: str) -> dict[str, Route]:
    """Check every route's chain and every plugin setting now, at start-up; ConfigError if wrong."""
    installed = ", ".join(plugins) or "(none)"
    problems: list[str] = []
    if "default" not in settings.routes:
        problems.append(f"{source}: key 'routes.default': required: the route for traffic no other route matches")
    for name in settings.plugins:
        if name not in plugins:
            problems.append(
                f"{source}: key 'plugins.{name}': no plugin named '{name}' is installed; installed: {installed}"
            )
    routes: dict[str, Route] = {}
    for route_name, route in settings.routes.items():
        links: list[ChainLink] = []
        for index, plugin_name in enumerate(route.chain):
            info = plugins.get(plugin_name)
            if info is None:
                problems.append(
                    f"{source}: key 'routes.{route_name}.chain[{index}]': no plugin named '{plugin_name}' "
                    f"is installed; installed: {installed}"
                )
                continue
            merged = {**settings.plugins.get(plugin_name, {}), **route.plugins.get(plugin_name, {})}
            try:
                links.append(ChainLink(info, info.cls.Settings.model_validate(merged)))
            except ValidationError as exc:
                where = (
                    ("routes", route_name, "plugins", plugin_name)
                    if plugin_name in route.plugins
                    else ("plugins", plugin_name)
                )
                problems.append(describe_validation_error(source, exc, where))
        for plugin_name in route.plugins:
            if plugin_name not in route.chain:
                problems.append(
                    f"{source}: key 'routes.{route_name}.plugins.{plugin_name}': "
                    f"'{plugin_name}' is not in this route's chain {route.chain}"
                )
        routes[route_name] = Route(route_name, tuple(links), route.failure_policy, route.path_prefix)
    if problems:
        raise ConfigError("\n".join(dict.fromkeys(problems)))
    return routes


@dataclass(frozen=True)
class LoadedHost:
    """Everything a command needs from a settings file, all checked: the settings, the plugin
    manager, the installed plugins and the routes ready to serve."""

    source: str
    settings: Settings
    pm: pluggy.PluginManager
    plugins: dict[str, PluginInfo]
    routes: dict[str, Route]


def load_host(config: str | Path | None) -> LoadedHost:
    """Read ``config`` (None: defaults and the environment), load the plugins, build and check
    every route; :class:`ConfigError` on any problem. Every command starts here."""
    source = str(config) if config is not None else "environment"
    settings = load_settings(config)
    pm = make_plugin_manager(modules=settings.server.plugin_modules, source=source)
    plugins = discover(pm)
    routes = build_routes(settings, plugins, source)
    return LoadedHost(source, settings, pm, plugins, routes)
