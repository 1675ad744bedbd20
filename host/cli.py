"""The ``extproc-host`` command: serve (the default), init, check, plugins, health, envoy-config, echo, demo,
new-plugin.

Each subcommand's parser carries its handler (``set_defaults(handler=...)``); every handler that
reads a settings file starts from :func:`~extproc_host.registry.load_host`. Commands whose
dependencies are an extra (``echo``, ``demo``) say which extra to install when it is missing.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from importlib.metadata import version

from .envoyconfig.command import add_envoy_config_parser
from .errors import ConfigError
from .listeners import ListenAddress, parse_address
from .modes import RouteModes
from .registry import load_host
from .routes import Route
from .settings import parse_listen
from .tracing import require_sdk


class MissingExtra(Exception):
    """A command needs a package that comes with one of the distribution's extras."""

    def __init__(self, command: str, extra: str, error: ImportError) -> None:
        self.command, self.extra = command, extra
        super().__init__(
            f"extproc-host {command} needs the '{extra}' extra ({error.name or error} is not installed): "
            f"pip install 'extproc-host[{extra}]'"
        )


def _requires(command: str, extra: str, *modules: str) -> None:
    """Import ``modules`` now, or raise MissingExtra naming the extra that brings them."""
    import importlib

    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise MissingExtra(command, extra, exc) from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="extproc-host",
        description="Envoy External Processing host: streams HTTP bodies through per-route plugin chains.",
        epilog="With no command, 'serve' is assumed: extproc-host --config config/full_duplex.toml",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version('extproc-host')}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the ext_proc gRPC server (the default command)")
    serve.set_defaults(handler=_serve)
    serve.add_argument("--config", "-c", help="settings TOML file (default: built-in defaults)")
    serve.add_argument(
        "--listen",
        help="HOST:PORT or unix:/path/to.sock to listen on, overriding [server] listen (port 0: any free port)",
    )
    serve.add_argument(
        "--workers", type=int, help="processes serving the port (SO_REUSEPORT), overriding [server] workers"
    )
    serve.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)  # set by the --workers supervisor
    serve.add_argument(
        "--log-level", choices=["debug", "info", "warning", "error"], help="overrides [server] log_level"
    )

    init = sub.add_parser(
        "init", help="write a commented starter settings file (extproc-host.toml) into the current directory"
    )
    init.add_argument("--envoy", action="store_true", help="also write envoy.yaml, the Envoy config for those settings")
    init.add_argument("--force", action="store_true", help="overwrite files that exist")
    init.set_defaults(handler=_init)

    check = sub.add_parser("check", help="validate a settings file and its plugins' settings, then exit")
    check.add_argument("--config", "-c", required=True, help="settings TOML file")
    check.set_defaults(handler=_check)

    sub.add_parser("plugins", help="list the installed plugins").set_defaults(handler=_plugins)

    probe = sub.add_parser(
        "health", help="ask a running host for its gRPC health (exit 0 when SERVING: for container health checks)"
    )
    probe.add_argument(
        "address",
        nargs="?",
        default="127.0.0.1:9001",
        help="HOST:PORT or unix:PATH of the host (default 127.0.0.1:9001)",
    )
    probe.add_argument("--service", default="", help="service name to ask about (default: the whole server)")
    probe.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for an answer (default 5)")
    probe.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="S",
        help="keep asking for up to S seconds until the host answers SERVING (after starting one in a script)",
    )
    probe.add_argument("--ca-file", help="TLS: verify the host's certificate against this CA")
    probe.set_defaults(handler=_health)

    echo = sub.add_parser("echo", help="run the echo upstream (streams every request body back)")
    echo.add_argument("--listen", default="127.0.0.1:8080", help="HOST:PORT (default 127.0.0.1:8080)")
    echo.add_argument(
        "--http2", action="store_true", help="serve HTTP/2 with prior knowledge (h2c) and HTTP/1.1, with hypercorn"
    )
    echo.add_argument("--tag", metavar="NAME", help="add x-upstream: NAME to every answer (HTTP/1.1 echo only)")
    echo.set_defaults(handler=_echo)
    demo = sub.add_parser(
        "demo",
        help="N concurrent uploads through Envoy + host (FULL_DUPLEX_STREAMED, STREAMED) and Envoy alone; "
        "table, RSS chart and samples",
    )
    demo.add_argument("-n", "--concurrency", type=int, default=10, help="concurrent uploads per mode (default 10)")
    demo.add_argument("--size-mib", type=int, default=70, help="size of the generated file in MiB (default 70)")
    demo.add_argument("--file", help="upload this file instead of a generated one (e.g. a video)")
    demo.add_argument("--results", help="directory for rss.png and samples.json (default demo-results/<UTC time>)")
    demo.add_argument(
        "--modes",
        default="full-duplex,streamed,direct",
        help="comma-separated, from full-duplex, streamed, direct (default all three)",
    )
    demo.add_argument(
        "--keep-running", action="store_true", help="afterwards leave a stack up and print curl commands to try it"
    )
    demo.add_argument(
        "--keep-copies",
        action="store_true",
        help="keep file_tee's copies of the full-duplex bodies in the results directory (default: deleted once checked)",
    )
    demo.set_defaults(handler=_demo)
    add_envoy_config_parser(sub)
    new_plugin = sub.add_parser(
        "new-plugin", help="write a new plugin package: pyproject with the entry point, plugin, settings, tests, README"
    )
    new_plugin.add_argument("name", help="the plugin's name, as routes list it in their chain (e.g. card-redact)")
    new_plugin.add_argument("--directory", "-d", default=".", help="where to create the package (default: here)")
    new_plugin.set_defaults(handler=_new_plugin)
    return parser


def _serve(args: argparse.Namespace) -> int:
    from .server import serve

    host = load_host(args.config)
    settings = host.settings
    try:
        address = parse_address(args.listen or settings.server.listen)
    except ValueError as exc:
        raise ConfigError(f"--listen: {exc}") from None
    _configure_logging(args.log_level or settings.server.log_level, settings.server.log_format)
    workers = args.workers if args.workers is not None else settings.server.workers
    if args.ready_fd is None and workers != 1:
        return _supervise(args, address, workers, settings.server.metrics_listen, settings.server.watch_config_seconds)
    loop_factory = None
    if settings.server.event_loop == "uvloop":
        import uvloop

        loop_factory = uvloop.new_event_loop
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            if args.ready_fd is None:
                runner.run(serve(host, args.listen, config=args.config))
            else:
                from .workers import announce_ready

                ready = lambda _shown: announce_ready(args.ready_fd)  # noqa: E731
                # The supervisor watches the settings file and sends SIGHUP: the workers do not.
                runner.run(serve(host, args.listen, config=args.config, reuse_port=True, on_ready=ready, watch=False))
    except OSError as exc:
        print(f"extproc-host: {exc}", file=sys.stderr)
        return 1
    return 0


def _supervise(
    args: argparse.Namespace, address: ListenAddress, workers: int, metrics_listen: str | None, watch_seconds: float
) -> int:
    """Run ``workers`` server processes on ``address`` (workers.py); the exit status."""
    from .workers import supervise

    if workers < 1:
        raise ConfigError(f"--workers: must be at least 1, got {workers}")
    if address.is_unix:
        source = args.config or "environment"
        raise ConfigError(
            f"{source}: key 'server.workers': more than one worker needs a TCP listen address, not {address.target()}"
        )
    try:
        return supervise(
            address,
            workers,
            config=args.config,
            log_level=args.log_level,
            metrics_listen=metrics_listen,
            watch_seconds=watch_seconds,
        )
    except OSError as exc:
        print(f"extproc-host: {exc}", file=sys.stderr)
        return 1


def _health(args: argparse.Namespace) -> int:
    """Print the host's health status; 0 when SERVING, 1 otherwise or when unreachable. With
    ``--wait S``, ask again every 0.2 s while the host is not there or not SERVING, for up to
    S seconds."""
    import time

    import grpc

    from .health import check

    try:
        address = parse_address(args.address)
    except ValueError as exc:
        raise ConfigError(f"address: {exc}") from None
    target = address.reachable().target()
    deadline = time.monotonic() + args.wait
    while True:
        try:
            status = check(target, args.service, args.timeout, args.ca_file)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() < deadline:
                time.sleep(0.2)
                continue
            why = f"no service named {args.service!r}" if exc.code() == grpc.StatusCode.NOT_FOUND else exc.details()
            print(f"extproc-host health: {target}: {exc.code().name}: {why}", file=sys.stderr)
            return 1
        except OSError as exc:
            print(f"extproc-host health: {exc}", file=sys.stderr)
            return 1
        if status == "SERVING" or time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    print(status)
    return 0 if status == "SERVING" else 1


def _init(args: argparse.Namespace) -> int:
    """Write extproc-host.toml (and with --envoy, envoy.yaml generated from it)."""
    from pathlib import Path

    from .starter import ENVOY_NAME, LOOPBACK_ENVOY, SETTINGS_NAME, WouldOverwrite, check_free, write_starter

    settings, envoy = Path(SETTINGS_NAME), Path(ENVOY_NAME)
    try:
        check_free([settings, envoy] if args.envoy else [settings], args.force)
    except WouldOverwrite as exc:
        print(f"extproc-host init: {exc}", file=sys.stderr)
        return 1
    write_starter(settings)
    print(f"wrote {settings}: edit it, then: extproc-host check --config {settings}")
    if args.envoy:
        # The Envoy health check that the starter's drain_seconds (5 s) is sized for; Envoy on
        # loopback, as the starter's /upload route copies every body it gets to disk.
        command = ["envoy-config", "--config", str(settings), "--health-check", "2", "--listen", LOOPBACK_ENVOY]
        command += ["-o", str(envoy)]
        envoy_args = _parser().parse_args(command)
        status: int = envoy_args.handler(envoy_args)
        if status != 0:
            return status
        print(
            f"wrote {envoy}: envoy -c {envoy} (Envoy on {LOOPBACK_ENVOY}, the host on 127.0.0.1:9001, "
            "upstream 127.0.0.1:8080; envoy-config --listen 0.0.0.0:18080 to take other machines' requests)"
        )
    return 0


def _check(args: argparse.Namespace) -> int:
    host = load_host(args.config)
    settings, routes = host.settings, host.routes
    for name, route in routes.items():
        chain = " -> ".join(link.info.name for link in route.chain)
        matches = [f"path prefix {route.path_prefix}"] if route.path_prefix else []
        matches += [f"{header}: {value}" for header, value in route.match_headers]
        where = f" ({', '.join(matches)})" if matches else ""
        to = f" to {route.upstream}" if route.upstream != "upstream" else ""
        # An observe-only route is off the data path: Envoy fails open whatever the policy says.
        policy = "observe only: failures never reach the client" if host.modes[name].observe else route.failure_policy
        print(f"route {name}{where}{to}: {chain} [{policy}]")
        print(f"  Envoy sends: {describe_modes(host.modes[name])}")
        control = describe_control(route)
        if control and not host.modes[name].disabled:
            print(f"  also: {control}")
    tracing = settings.server.tracing
    if tracing.enabled:
        require_sdk()
        print(f"traces: OTLP/gRPC to {tracing.endpoint}, sample_ratio {tracing.sample_ratio:g}")
    print(f"{args.config}: OK, listen {settings.server.listen}")
    return 0


def describe_control(route: Route) -> str:
    """What a route exchanges with the host besides the messages, or "" (``check``)."""
    control = route.control
    parts = []
    extra = [name for name in control.request_attributes if name != "xds.route_name"]
    if extra or control.response_attributes:
        parts.append(f"attributes {', '.join([*extra, *control.response_attributes])}")
    if control.forwarding_namespaces:
        parts.append(f"metadata forwarded {', '.join(control.forwarding_namespaces)}")
    if control.receiving_namespaces:
        parts.append(f"metadata received {', '.join(control.receiving_namespaces)}")
    if control.mutation_rules is not None:
        rules = control.mutation_rules.model_dump(exclude_defaults=True)
        parts.append("mutation rules " + ", ".join(f"{k} = {v}" for k, v in rules.items()))
    if control.route_cache_action != "DEFAULT":
        parts.append(f"route cache {control.route_cache_action}")
    if control.override_modes:
        parts.append("mode overrides allowed")
    if control.message_timeout is not None:
        parts.append(f"message timeout {control.message_timeout:g} s")
    if control.max_message_timeout:
        parts.append(f"plugins may ask for up to {control.max_message_timeout:g} s")
    return "; ".join(parts)


def describe_modes(modes: RouteModes) -> str:
    """One line saying what a route asks Envoy for (``check``)."""
    if modes.disabled:
        return "nothing (ext_proc disabled on this route: its chain needs nothing)"
    parts = [
        "request headers",
        f"request body {modes.request_body}",
        f"request trailers {'SEND' if modes.request_trailers else 'SKIP'}",
        f"response headers {'SEND' if modes.response_headers else 'SKIP'}",
        f"response body {modes.response_body}",
        f"response trailers {'SEND' if modes.response_trailers else 'SKIP'}",
    ]
    if modes.buffer_limit_bytes is not None:
        parts.append(f"buffer limit {modes.buffer_limit_bytes} bytes")
    if modes.observe:
        return "a copy, in observability mode (Envoy awaits no answer): " + ", ".join(parts)
    return ", ".join(parts)


def _plugins(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from .registry import discover, make_plugin_manager

    pm = make_plugin_manager()
    table = Table("plugin", "version", "distribution", "hooks", title="installed extproc-host plugins")
    for info in discover(pm).values():
        table.add_row(info.name, info.version, info.distribution, ", ".join(info.hooks) or "(none: passes everything)")
    for broken in pm.broken.values():
        table.add_row(broken.entry_point, broken.version, broken.distribution, f"BROKEN: {broken.error}", style="red")
    Console().print(table)
    return 0


def _echo(args: argparse.Namespace) -> int:
    _requires("echo", "stack", "aiohttp")
    if args.http2:
        _requires("echo --http2", "stack", "hypercorn")
    from .stack.echo import serve

    try:
        parse_listen(args.listen)
    except ValueError as exc:
        raise ConfigError(f"--listen: {exc}") from None
    if args.tag is not None and args.http2:
        raise ConfigError("--tag: only the HTTP/1.1 echo tags its answers (leave out --http2)")
    _configure_logging("warning")
    serve(args.listen, http2=args.http2, tag=args.tag)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    _requires("demo", "demo", "aiohttp", "psutil", "matplotlib")  # checked now, not after the uploads
    from .stack.demo import DemoOptions, parse_modes, run

    if args.concurrency < 1:
        raise ConfigError(f"--concurrency: must be at least 1, got {args.concurrency}")
    if args.size_mib < 1:
        raise ConfigError(f"--size-mib: must be at least 1, got {args.size_mib}")
    if args.file is not None and not Path(args.file).is_file():
        raise ConfigError(f"--file: {args.file} is not a readable file")
    try:
        modes = parse_modes(args.modes)
    except ValueError as exc:
        raise ConfigError(f"--modes: {exc}") from None
    options = DemoOptions(
        concurrency=args.concurrency,
        size_mib=args.size_mib,
        file=Path(args.file) if args.file else None,
        results=Path(args.results) if args.results else None,
        modes=modes,
        keep_running=args.keep_running,
        keep_copies=args.keep_copies,
    )
    return run(options)


def _new_plugin(args: argparse.Namespace) -> int:
    from .testing.scaffold import run_new_plugin

    return run_new_plugin(args)


def _configure_logging(level: str, fmt: str = "text") -> None:
    from .logs import configure

    configure(level, fmt)


def _parse(argv: list[str]) -> argparse.Namespace:
    """Parse ``argv``; with no command (or only options), ``serve`` is assumed."""
    parser = _parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if not argv or (argv[0] not in sub.choices and argv[0] not in ("-h", "--help", "--version")):
        argv = ["serve", *argv]
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """The console script: run the command, map known errors to one paragraph and a status."""
    args = _parse(list(sys.argv[1:] if argv is None else argv))
    try:
        status: int = args.handler(args)
        return status
    except ConfigError as exc:
        print(f"extproc-host: invalid settings\n{exc}", file=sys.stderr)
        return 2
    except MissingExtra as exc:
        print(f"{exc}", file=sys.stderr)
        return 2
    except ImportError as exc:
        print(f"extproc-host: a plugin failed to load: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
