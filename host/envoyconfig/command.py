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
        help="HOST:PORT or unix:PATH where Envoy reaches the host (default: [server] listen)",
    )
    envoy.add_argument(
        "--upstream",
        default="127.0.0.1:8080",
        metavar="HOST:PORT",
        help="HOST:PORT of the upstream (default 127.0.0.1:8080)",
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
    envoy.add_argument("--no-ext-proc", action="store_true", help="no ext_proc filter: Envoy straight to the upstream")
    envoy.add_argument("--output", "-o", metavar="FILE", help="write to this file instead of standard output")
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
    if args.host_address:
        words += ["--host-address", args.host_address]
    if args.upstream != "127.0.0.1:8080":
        words += ["--upstream", args.upstream]
    if args.message_timeout != 5.0:
        words += ["--message-timeout", f"{args.message_timeout:g}"]
    if args.health_check is not None:
        words += ["--health-check", f"{args.health_check:g}"]
    if args.observe_close_timeout != 5.0:
        words += ["--observe-close-timeout", f"{args.observe_close_timeout:g}"]
    if args.no_ext_proc:
        words.append("--no-ext-proc")
    return " ".join(words)


def _envoy_options(args: argparse.Namespace) -> EnvoyOptions:
    """EnvoyOptions from the command line; ConfigError naming the option when one is wrong."""
    from .bootstrap import EnvoyOptions

    listen = args.listen or f"0.0.0.0:{18080 if args.port is None else args.port}"
    checks = {"--listen/--port": listen, "--upstream": args.upstream}
    try:
        ipaddress.ip_address(args.admin_address)
    except ValueError:
        raise ConfigError(f"--admin-address: expected an IP address, got {args.admin_address!r}") from None
    if args.host_address and not args.host_address.startswith("unix:"):
        checks["--host-address"] = args.host_address
    for option, value in checks.items():
        try:
            parse_listen(value)
        except ValueError as exc:
            raise ConfigError(f"{option}: {exc}") from None
    if args.host_address == "unix:":
        raise ConfigError("--host-address: expected unix:PATH with a path")
    if not 0 <= args.admin_port <= 65535:
        raise ConfigError(f"--admin-port: expected a port number, got {args.admin_port}")
    if args.health_check is not None and args.health_check <= 0:
        raise ConfigError(f"--health-check: expected seconds above 0, got {args.health_check:g}")
    if args.observe_close_timeout <= 0:
        raise ConfigError(f"--observe-close-timeout: expected seconds above 0, got {args.observe_close_timeout:g}")
    if args.message_timeout <= 0:
        raise ConfigError(f"--message-timeout: expected seconds above 0, got {args.message_timeout:g}")
    return EnvoyOptions(
        listen=listen,
        admin_port=args.admin_port,
        admin_address=args.admin_address,
        host_address=args.host_address,
        upstream=args.upstream,
        message_timeout=args.message_timeout,
        ext_proc=not args.no_ext_proc,
        health_check_interval=args.health_check,
        observe_close_timeout=args.observe_close_timeout,
    )


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
