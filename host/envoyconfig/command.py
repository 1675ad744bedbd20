"""The ``extproc-host envoy-config`` command: options, checks, output.

envoy-data-plane (slow to import) is imported only when the command runs.
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
from typing import TYPE_CHECKING

from ..drain import UNHEALTHY_THRESHOLD, drain_seconds_for
from ..errors import ConfigError
from ..registry import load_host
from ..settings import parse_listen

if TYPE_CHECKING:
    from .bootstrap import EnvoyOptions


def add_envoy_config_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The ``envoy-config`` subcommand's options."""
    envoy = sub.add_parser("envoy-config", help="print the Envoy bootstrap (YAML) that matches a settings file")
    envoy.add_argument("--config", "-c", metavar="FILE", help="settings TOML file (default: built-in defaults)")
    where = envoy.add_mutually_exclusive_group()
    where.add_argument("--listen", metavar="HOST:PORT", help="HOST:PORT of Envoy's listener (default 0.0.0.0:18080)")
    where.add_argument("--port", type=int, metavar="N", help="port of Envoy's listener on 0.0.0.0")
    envoy.add_argument("--admin-port", type=int, metavar="N", default=9901, help="Envoy admin port (default 9901)")
    envoy.add_argument(
        "--admin-address",
        metavar="HOST",
        default="127.0.0.1",
        help="Envoy admin address (default 127.0.0.1; 0.0.0.0 for a kubelet probe)",
    )
    envoy.add_argument(
        "--host-address",
        metavar="ADDRESS",
        action="append",
        default=[],
        help="HOST:PORT or unix:PATH where Envoy reaches the host (default: [server] listen); "
        "repeat it for several hosts, each an endpoint of the extproc cluster",
    )
    envoy.add_argument(
        "--upstream",
        action="append",
        default=[],
        metavar="[NAME=]HOST:PORT",
        help="HOST:PORT of the upstream (default 127.0.0.1:8080); NAME=HOST:PORT: of the upstream a route names "
        "(routes.<route>.upstream); repeat it for each",
    )
    envoy.add_argument(
        "--access-log",
        metavar="PATH",
        help="Envoy writes an access log here (JSON lines, with the dynamic metadata the routes receive; "
        "/dev/stdout for a container)",
    )
    envoy.add_argument(
        "--message-timeout", type=float, default=5.0, metavar="S", help="seconds the host has per message (default 5)"
    )
    envoy.add_argument(
        "--health-check",
        type=float,
        metavar="S",
        help="gRPC health-check every host endpoint every S seconds, so replicas shutting down get no new streams",
    )
    envoy.add_argument(
        "--observe-close-timeout",
        type=float,
        default=5.0,
        metavar="S",
        help="observe-only routes: seconds Envoy keeps feeding the host an exchange the client is done with (default 5)",
    )
    envoy.add_argument(
        "--extproc-window",
        type=int,
        metavar="BYTES",
        help="HTTP/2 stream window of the ext_proc cluster (connection window: 16x); default Envoy's 256 MiB",
    )
    envoy.add_argument(
        "--extproc-buffer-limit", type=int, metavar="BYTES", help="per-connection buffer limit of the ext_proc cluster"
    )
    envoy.add_argument(
        "--listener-buffer-limit", type=int, metavar="BYTES", help="per-connection buffer limit of Envoy's listener"
    )
    envoy.add_argument(
        "--grpc-client",
        choices=("envoy", "google"),
        default="envoy",
        help="Envoy's gRPC client for the host: envoy (envoy_grpc, the extproc cluster; the default) or google "
        "(google_grpc: gRPC's C++ client to one host address, no cluster, no health checks)",
    )
    envoy.add_argument("--no-ext-proc", action="store_true", help="no ext_proc filter: Envoy straight to the upstream")
    envoy.add_argument("--output", "-o", metavar="FILE", help="write to this file instead of standard output")
    envoy.add_argument(
        "--diff",
        metavar="FILE",
        help="compare with the Envoy config in FILE (what Envoy runs) instead of printing: the differences, "
        "exit status 1 when there are some (a reload that needs Envoy's config changed names this)",
    )
    envoy.set_defaults(handler=run_envoy_config)


def _envoy_config_command(args: argparse.Namespace) -> str:
    """The command line that reproduces this output, for the generated file's header."""
    words = ["extproc-host", "envoy-config"]
    if args.config:
        words += ["--config", args.config]
    if args.listen:
        words += ["--listen", args.listen]
    if args.port is not None:
        words += ["--port", str(args.port)]
    if args.admin_port != 9901:
        words += ["--admin-port", str(args.admin_port)]
    if args.admin_address != "127.0.0.1":
        words += ["--admin-address", args.admin_address]
    for address in args.host_address:
        words += ["--host-address", address]
    for upstream in args.upstream:
        words += ["--upstream", upstream]
    if args.access_log:
        words += ["--access-log", args.access_log]
    if args.message_timeout != 5.0:
        words += ["--message-timeout", f"{args.message_timeout:g}"]
    if args.health_check is not None:
        words += ["--health-check", f"{args.health_check:g}"]
    if args.observe_close_timeout != 5.0:
        words += ["--observe-close-timeout", f"{args.observe_close_timeout:g}"]
    for flag in ("extproc_window", "extproc_buffer_limit", "listener_buffer_limit"):
        if getattr(args, flag) is not None:
            words += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
    if args.grpc_client != "envoy":
        words += ["--grpc-client", args.grpc_client]
    if args.no_ext_proc:
        words.append("--no-ext-proc")
    return " ".join(words)


def _envoy_options(args: argparse.Namespace) -> EnvoyOptions:
    """EnvoyOptions from the command line; ConfigError naming the option when one is wrong."""
    from .bootstrap import EnvoyOptions

    listen = args.listen or f"0.0.0.0:{18080 if args.port is None else args.port}"
    upstream, named = _upstreams(args.upstream)
    checks = {"--listen/--port": listen, "--upstream": upstream}
    try:
        ipaddress.ip_address(args.admin_address)
    except ValueError:
        raise ConfigError(f"--admin-address: expected an IP address, got {args.admin_address!r}") from None
    checked = list(checks.items())
    checked += [("--upstream", address) for _, address in named]
    checked += [("--host-address", a) for a in args.host_address if not a.startswith("unix:")]
    for option, value in checked:
        try:
            parse_listen(value)
        except ValueError as exc:
            raise ConfigError(f"{option}: {exc}") from None
    if "unix:" in args.host_address:
        raise ConfigError("--host-address: expected unix:PATH with a path")
    _check_host_addresses(args.host_address)
    if not 0 <= args.admin_port <= 65535:
        raise ConfigError(f"--admin-port: expected a port number, got {args.admin_port}")
    if args.health_check is not None and args.health_check <= 0:
        raise ConfigError(f"--health-check: expected seconds above 0, got {args.health_check:g}")
    if args.extproc_window is not None and not 65535 <= args.extproc_window <= 2**31 - 1:
        raise ConfigError(
            f"--extproc-window: expected 65535 to 2147483647 bytes (HTTP/2's range), got {args.extproc_window}"
        )
    for flag in ("extproc_buffer_limit", "listener_buffer_limit"):
        value = getattr(args, flag)
        if value is not None and not 1024 <= value <= 2**32 - 1:
            raise ConfigError(f"--{flag.replace('_', '-')}: expected at least 1024 bytes, got {value}")
    if args.observe_close_timeout <= 0:
        raise ConfigError(f"--observe-close-timeout: expected seconds above 0, got {args.observe_close_timeout:g}")
    if args.message_timeout <= 0:
        raise ConfigError(f"--message-timeout: expected seconds above 0, got {args.message_timeout:g}")
    if args.grpc_client == "google":
        if len(args.host_address) > 1:
            raise ConfigError(
                "--grpc-client google: one --host-address only (gRPC's C++ client reaches one address; "
                "Envoy's own client balances several through the extproc cluster)"
            )
        for flag, value in (("--health-check", args.health_check), ("--extproc-window", args.extproc_window)):
            if value is not None:
                raise ConfigError(f"{flag} configures the extproc cluster, which --grpc-client google does not use")
    return EnvoyOptions(
        listen=listen,
        admin_port=args.admin_port,
        admin_address=args.admin_address,
        host_addresses=tuple(args.host_address),
        upstream=upstream,
        upstreams=named,
        access_log=args.access_log,
        message_timeout=args.message_timeout,
        ext_proc=not args.no_ext_proc,
        health_check_interval=args.health_check,
        observe_close_timeout=args.observe_close_timeout,
        extproc_window=args.extproc_window,
        extproc_buffer_limit=args.extproc_buffer_limit,
        listener_buffer_limit=args.listener_buffer_limit,
        grpc_client=args.grpc_client,
    )


def _upstreams(given: list[str]) -> tuple[str, tuple[tuple[str, str], ...]]:
    """The default upstream's address and the named ones from the ``--upstream`` options;
    ConfigError for a name given twice."""
    default = "127.0.0.1:8080"
    named: dict[str, str] = {}
    for value in given:
        name, sep, address = value.rpartition("=")
        if not sep or name == "upstream":
            default = address
        elif name in named:
            raise ConfigError(f"--upstream: {name} is given twice")
        else:
            named[name] = address
    return default, tuple(named.items())


def _check_host_addresses(addresses: list[str]) -> None:
    """ConfigError when the ``--host-address`` values cannot share one cluster: the same
    address twice, or a Unix socket next to a hostname (a STRICT_DNS cluster has no pipes)."""
    if len(set(addresses)) < len(addresses):
        twice = next(a for a in addresses if addresses.count(a) > 1)
        raise ConfigError(f"--host-address: {twice} is given twice")
    pipes = [a for a in addresses if a.startswith("unix:")]
    names = [a for a in addresses if not a.startswith("unix:") and not _is_ip(parse_listen(a)[0])]
    if pipes and names:
        raise ConfigError(
            f"--host-address: {pipes[0]} and {names[0]} cannot be endpoints of one cluster "
            "(a hostname makes it STRICT_DNS, which takes no Unix sockets)"
        )


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _drain_advice(interval: float, drain_seconds: float, source: str) -> str:
    """The header lines that tie the health check to the host's drain delay; a warning on
    stderr when the settings' ``drain_seconds`` is too short for this health check."""
    needed = drain_seconds_for(interval)
    if drain_seconds < needed:
        print(
            f"extproc-host envoy-config: warning: {source}: [server] drain_seconds = {drain_seconds:g} is shorter "
            f"than this health check needs ({needed:g}): a stopping host would refuse streams Envoy still sends it",
            file=sys.stderr,
        )
    return (
        f"Envoy marks a stopping host unhealthy within {interval:g} s x {UNHEALTHY_THRESHOLD} failed checks: the host's\n"
        f"[server] drain_seconds must be at least {needed:g} (these settings: {drain_seconds:g})."
    )


def _diff(path: str, generated: str) -> int:
    """Print how the config in ``path`` differs from ``generated`` (both read as data, keys
    sorted, comments left out); 0 when they are the same, 1 when not, 2 when ``path`` cannot
    be read."""
    import difflib

    import yaml

    try:
        with open(path) as fh:
            running = yaml.safe_load(fh)
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"--diff: cannot read {path}: {exc}") from None

    def lines(data: object) -> list[str]:
        return yaml.safe_dump(data, sort_keys=True, width=120).splitlines(keepends=True)

    diff = list(difflib.unified_diff(lines(running), lines(yaml.safe_load(generated)), path, "generated"))
    if not diff:
        print(f"{path} is what these settings generate")
        return 0
    sys.stdout.writelines(diff)
    return 1


def run_envoy_config(args: argparse.Namespace) -> int:
    """Print (or write with -o) the Envoy bootstrap for ``args.config``."""
    host = load_host(args.config)  # settings, plugins and routes checked as for serve
    options = _envoy_options(args)
    from .bootstrap import build_bootstrap, render_yaml  # slow import: only for this command

    bootstrap = build_bootstrap(host.settings, host.routes, options, host.source)
    header = (
        f"Envoy bootstrap generated from {args.config or 'the built-in default settings'}: do not edit, regenerate it with\n"
        f"  {_envoy_config_command(args)}"
    )
    if args.health_check is not None:
        header += "\n" + _drain_advice(args.health_check, host.settings.server.drain_seconds, host.source)
    text = render_yaml(bootstrap, header)
    if args.diff:
        return _diff(args.diff, text)
    if args.output:
        try:
            with open(args.output, "w") as fh:
                fh.write(text)
        except OSError as exc:
            print(f"extproc-host: cannot write {args.output}: {exc.strerror}", file=sys.stderr)
            return 1
    else:
        sys.stdout.write(text)
    return 0
