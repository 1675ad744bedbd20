"""The plugin registry: one pluggy PluginManager, the plugins it found, their settings per route.

Built-in and third-party plugins arrive the same way: through the ``extproc_host.plugins``
entry-point group. An entry point that fails to load is recorded (``pm.broken``) rather than
raised: it only stops the routes that use it. Each module registers its plugin classes through the
``register_plugins`` hook. Set ``EXTPROC_TRACE_HOOKS=1`` to log every pluggy hook call.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pluggy
from pluggy import HookImpl
from pydantic import ValidationError

from . import hookspecs
from .control import route_control
from .errors import ConfigError
from .modes import RouteModes, route_modes
from .plugin import Plugin, overridden_hooks
from .routes import ChainLink, PluginInfo, Route
from .settings import Settings, describe_validation_error, environment_origin, load_settings

ENTRY_POINT_GROUP = "extproc_host.plugins"

log = logging.getLogger("extproc_host.registry")


@dataclass(frozen=True)
class BrokenPlugin:
    """An entry point (or plugin module) whose plugins could not be loaded, and why."""

    entry_point: str
    distribution: str
    version: str
    error: str

    @property
    def origin(self) -> str:
        """Words naming where the plugin comes from, for messages."""
        version = f" {self.version}" if self.version else ""
        return f"entry point '{self.entry_point}' of {self.distribution}{version}"


class HostPluginManager(pluggy.PluginManager):
    """pluggy's PluginManager that remembers where each module came from and what failed to load."""

    def __init__(self) -> None:
        super().__init__(hookspecs.PROJECT)
        #: module id -> (where it came from, version): "extproc-shout" or "module my_plugins".
        self.origins: dict[int, tuple[str, str]] = {}
        #: entry point name -> why its plugins could not be loaded.
        self.broken: dict[str, BrokenPlugin] = {}

    def origin_of(self, module: object) -> tuple[str, str]:
        """(distribution or module, version) of a registered module."""
        found = self.origins.get(id(module))
        if found is not None:
            return found
        return (f"module {getattr(module, '__name__', module)!s}", "")


def _load_entry_points(pm: HostPluginManager) -> None:
    """Load every ``extproc_host.plugins`` entry point; one that fails is recorded, not raised,
    so a broken distribution only matters to the routes that use its plugins."""
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist
        dist_name = dist.metadata["Name"] if dist is not None else "(unknown distribution)"
        dist_version = dist.version if dist is not None else ""
        if pm.has_plugin(ep.name) or pm.is_blocked(ep.name):
            continue
        try:
            module = ep.load()
        except Exception as exc:
            pm.broken[ep.name] = BrokenPlugin(ep.name, dist_name, dist_version, f"{type(exc).__name__}: {exc}")
            log.debug("entry point %s (%s) failed to load", ep.name, dist_name, exc_info=exc)
            continue
        if pm.is_registered(module):
            continue
        pm.register(module, name=ep.name)
        pm.origins[id(module)] = (dist_name, dist_version)


def _path_hint(name: str, exc: ImportError) -> str:
    """Why a plugin module next to the settings is not found: the console script does not put
    the working directory on ``sys.path`` (docs/hooks.md, plugin_modules)."""
    top = name.partition(".")[0]
    if not isinstance(exc, ModuleNotFoundError) or exc.name != top:
        return ""
    here = Path.cwd()
    if (here / f"{top}.py").is_file() or (here / top).is_dir():
        return f" ({top} is in the working directory, which is not on the host's import path: PYTHONPATH=.)"
    return " (it is looked for in site-packages and PYTHONPATH)"


def make_plugin_manager(
    load_entry_points: bool = True, modules: list[str] | None = None, source: str = "settings"
) -> HostPluginManager:
    """The one PluginManager: hookspecs added, entry points and ``modules`` loaded, tracing if asked for."""
    pm = HostPluginManager()
    pm.add_hookspecs(hookspecs)
    if load_entry_points:
        _load_entry_points(pm)
    for index, name in enumerate(modules or ()):
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            raise ConfigError(
                f"{source}: key 'server.plugin_modules[{index}]': cannot import '{name}': {exc}{_path_hint(name, exc)}"
            ) from None
        if pm.is_registered(module):
            continue
        pm.register(module, name=name)
        pm.origins[id(module)] = (f"module {name} (server.plugin_modules)", "")
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


def _origin(pm: pluggy.PluginManager, module: object) -> tuple[str, str]:
    if isinstance(pm, HostPluginManager):
        return pm.origin_of(module)
    return (f"module {getattr(module, '__name__', module)!s}", "")


def discover(pm: pluggy.PluginManager, extra: Sequence[type[Plugin]] = ()) -> dict[str, PluginInfo]:
    """Every plugin class registered through ``register_plugins`` (plus ``extra`` classes), by name.

    A ``register_plugins`` that raises is recorded in ``pm.broken`` (a HostPluginManager);
    two classes under one name, or a class that is not a named Plugin, are ConfigErrors
    naming where each came from.
    """
    found: dict[str, PluginInfo] = {}

    def add(cls: type[Plugin], dist: str, version: str) -> None:
        if not (isinstance(cls, type) and issubclass(cls, Plugin)):
            raise ConfigError(f"{dist} registered {cls!r}, which is not a subclass of extproc_host.Plugin")
        if not cls.name:
            raise ConfigError(
                f"{dist} registered plugin class {cls.__module__}.{cls.__qualname__} without a name: "
                'set the class attribute name = "..." (the name routes list in their chain)'
            )
        if cls.name in found and found[cls.name].cls is not cls:
            other = found[cls.name]
            raise ConfigError(f"plugin name '{cls.name}' is registered twice: by {other.distribution} and by {dist}")
        found[cls.name] = PluginInfo(cls.name, cls, dist, version, tuple(overridden_hooks(cls)))

    for impl in pm.hook.register_plugins.get_hookimpls():
        dist, version = _origin(pm, impl.plugin)

        def register(cls: type[Plugin], _dist: str = dist, _version: str = version) -> None:
            add(cls, _dist, _version)

        try:
            impl.function(register=register)
        except ConfigError:
            raise
        except Exception as exc:
            if not isinstance(pm, HostPluginManager):
                raise
            pm.broken[impl.plugin_name] = BrokenPlugin(
                impl.plugin_name, dist, version, f"register_plugins raised {type(exc).__name__}: {exc}"
            )
    for cls in extra:
        add(cls, f"module {cls.__module__}", "")
    return dict(sorted(found.items()))


def _unknown(
    source: str, key: str, name: str, installed: Sequence[str], broken: dict[str, BrokenPlugin], origin: str = ""
) -> str:
    """The problem for a plugin name nobody registered: a broken entry point of that name, else
    unknown, with the installed name it is a typo of. ``origin``: where the key comes from when
    not the file (an environment variable)."""
    if name in broken:
        b = broken[name]
        return f"{source}: key '{key}'{origin}: plugin '{name}' failed to load ({b.origin}): {b.error}"
    spelt = {n.replace("_", "-"): n for n in installed}  # file_tee and file-tee are one typo apart
    close = difflib.get_close_matches(name.replace("_", "-"), spelt, n=1)
    hint = f" (did you mean '{spelt[close[0]]}'?)" if close else ""
    also = "".join(f"; could not load {b.origin}: {b.error}" for b in broken.values())
    listed = ", ".join(installed) or "(none)"
    return f"{source}: key '{key}'{origin}: no plugin named '{name}' is installed{hint}; installed: {listed}{also}"


def shell_names(tables: dict[str, dict[str, Any]], plugins: dict[str, PluginInfo]) -> dict[str, dict[str, Any]]:
    """Plugin settings tables by plugin name, with ``_`` accepted for ``-``: a shell cannot set
    ``EXTPROC_PLUGINS__ADD-HEADER__NAME``, so ``EXTPROC_PLUGINS__ADD_HEADER__NAME`` sets
    ``[plugins.add-header] name`` (and wins over the file's value, as the environment does)."""
    by_shell_name = {name.replace("-", "_"): name for name in plugins if "-" in name}
    out: dict[str, dict[str, Any]] = {}
    for key, table in tables.items():
        name = key if key in plugins else by_shell_name.get(key, key)
        out[name] = {**out.get(name, {}), **table} if key != name else {**table, **out.get(name, {})}
    return out


def build_routes(
    settings: Settings,
    plugins: dict[str, PluginInfo],
    source: str,
    broken: dict[str, BrokenPlugin] | None = None,
) -> dict[str, Route]:
    """Check every route's chain and every plugin setting now, at start-up; ConfigError if wrong.

    ``broken``: entry points that failed to load; only a route (or ``[plugins.X]``) naming one fails.
    """
    broken = broken or {}
    installed = list(plugins)
    problems: list[str] = []
    if "default" not in settings.routes:
        problems.append(f"{source}: key 'routes.default': required: the route for traffic no other route matches")
    plugin_settings = shell_names(settings.plugins, plugins)
    for name in plugin_settings:
        if name not in plugins:
            origin = environment_origin(("plugins", name))
            problems.append(_unknown(source, f"plugins.{name}", name, installed, broken, origin))
    routes: dict[str, Route] = {}
    for route_name, route in settings.routes.items():
        links: list[ChainLink] = []
        for index, plugin_name in enumerate(route.chain):
            info = plugins.get(plugin_name)
            if info is None:
                problems.append(_unknown(source, f"routes.{route_name}.chain[{index}]", plugin_name, installed, broken))
                continue
            route_plugins = shell_names(route.plugins, plugins)
            merged = {**plugin_settings.get(plugin_name, {}), **route_plugins.get(plugin_name, {})}
            try:
                links.append(ChainLink(info, info.cls.Settings.model_validate(merged)))
            except ValidationError as exc:
                where = (
                    ("routes", route_name, "plugins", plugin_name)
                    if plugin_name in route.plugins
                    else ("plugins", plugin_name)
                )
                problems.append(describe_validation_error(source, exc, where))
        for plugin_name in shell_names(route.plugins, plugins):
            if plugin_name not in route.chain:
                problems.append(
                    f"{source}: key 'routes.{route_name}.plugins.{plugin_name}': "
                    f"'{plugin_name}' is not in this route's chain {route.chain}"
                )
        routes[route_name] = Route(
            route_name,
            tuple(links),
            route.failure_policy,
            route.path_prefix,
            match_headers=tuple(sorted(route.match_headers.items())),
            upstream=route.upstream,
        )
    if problems:
        raise ConfigError("\n".join(dict.fromkeys(problems)))
    return routes


@dataclass(frozen=True)
class LoadedHost:
    """Everything a command needs from a settings file, all checked: the settings, the plugin
    manager, the installed plugins, the routes ready to serve and what each asks Envoy for."""

    source: str
    settings: Settings
    pm: HostPluginManager
    plugins: dict[str, PluginInfo]
    routes: dict[str, Route]
    modes: dict[str, RouteModes]


def assemble_host(
    settings: Settings, source: str, *, extra: Sequence[type[Plugin]] = (), load_entry_points: bool = True
) -> LoadedHost:
    """Load the plugins ``settings`` may use (installed ones, ``plugin_modules``, ``extra``
    classes), build every route and work out its ext_proc modes and control options (what
    Envoy sends it, what else it exchanges); ConfigError on any problem.

    They are checked here so that ``serve``, ``check`` and ``envoy-config`` refuse the same
    files (a BUFFERED chain without ``buffer_limit_bytes``, a forced mode a plugin cannot work
    in, a plugin changing routing headers on a route that does not allow it).
    """
    pm = make_plugin_manager(load_entry_points, modules=settings.server.plugin_modules, source=source)
    plugins = discover(pm, extra)
    routes = build_routes(settings, plugins, source, pm.broken)
    problems: list[str] = []
    modes: dict[str, RouteModes] = {}
    for name, route in routes.items():
        try:
            modes[name] = route_modes(route, settings.routes[name], source)
            control = route_control(route, settings.routes[name], modes[name], source)
        except ConfigError as exc:
            problems.append(str(exc))
            continue
        routes[name] = replace(route, modes=modes[name], control=control)
    if problems:
        raise ConfigError("\n".join(problems))
    return LoadedHost(source, settings, pm, plugins, routes, modes)


def load_host(config: str | Path | None) -> LoadedHost:
    """Read ``config`` (None: defaults and the environment), load the plugins, build and check
    every route; :class:`ConfigError` on any problem. Every command starts here."""
    source = str(config) if config is not None else "environment"
    return assemble_host(load_settings(config), source)
