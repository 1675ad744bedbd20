"""Settings: a TOML file read with pydantic-settings, with ``EXTPROC_`` environment overrides.

    [server]
    listen = "127.0.0.1:9001"

    [routes.default]
    chain = ["passthrough"]

    [plugins.file_tee]          # a plugin's settings, validated by the plugin's own model
    directory = "temp"

    [routes.upload.plugins.file_tee]   # overrides for one route
    directory = "uploads"

Environment variables override the file: ``EXTPROC_SERVER__LISTEN=0.0.0.0:9001``.
Every problem is raised as :class:`ConfigError`, which names the file and the key.
"""

from __future__ import annotations

import os
import re
import tomllib
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from .drain import DEFAULT_DRAIN_SECONDS
from .errors import ConfigError
from .listeners import TlsSettings, parse_address, split_host_port
from .mutation_rules import MutationRules

DEFAULT_LISTEN = "127.0.0.1:9001"

_toml_file: ContextVar[Path | None] = ContextVar("_toml_file", default=None)


def parse_listen(value: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[::1]:9001`` for IPv6) into host and port."""
    found = split_host_port(value)
    if found is None:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return found


class Http2Settings(BaseModel):
    """``[server.http2]``: the builtin gRPC server's HTTP/2 limits, per connection (wire/)."""

    model_config = ConfigDict(extra="forbid")

    # SETTINGS_MAX_CONCURRENT_STREAMS: streams one connection may have open (more are refused
    # with REFUSED_STREAM, which Envoy retries on another connection), and the most handlers
    # that run at once for it. [server] max_concurrent_streams bounds all connections together.
    max_concurrent_streams: int = Field(default=1000, ge=1, le=2**31 - 1)
    # SETTINGS_INITIAL_WINDOW_SIZE: what a new stream may send before the host gives window back;
    # each stream reserves it in [server] max_held_bytes, and its window grows to [server]
    # stream_window_bytes once it takes what came, while the budget has room.
    initial_window_bytes: int = Field(default=16 * 1024, ge=1024, le=2**31 - 1)
    # SETTINGS_MAX_HEADER_LIST_SIZE: a larger header block ends its connection before it is
    # decoded. Envoy's gRPC requests carry a few hundred bytes (more with initial_metadata).
    max_header_list_size: int = Field(default=16 * 1024, ge=1024, le=1024 * 1024)
    # Seconds a new connection has to send the HTTP/2 preface and SETTINGS.
    preface_timeout_seconds: float = Field(default=10.0, gt=0)
    # Seconds a frame, or a header block spread over CONTINUATION frames, may take to arrive.
    frame_timeout_seconds: float = Field(default=10.0, gt=0)
    # Seconds a connection may stay without streams before it is closed gracefully (two
    # GOAWAYs: no stream in flight is lost; Envoy opens a new one when it needs it). 0: never.
    idle_timeout_seconds: float = Field(default=300.0, ge=0)
    # Seconds answers may wait on a peer that neither opens its flow-control window nor reads
    # the socket before the connection ends. 0: never.
    stall_timeout_seconds: float = Field(default=60.0, ge=0)
    # Floods, per connection and per kind (PING and SETTINGS frames; resets of streams never
    # answered, refused or failed streams; empty or tiny frames that complete nothing): past
    # flood_burst of one kind faster than flood_rate per second, the connection ends with
    # GOAWAY ENHANCE_YOUR_CALM. Envoy sends a handful of these a second at most.
    flood_burst: int = Field(default=1000, ge=10)
    flood_rate: float = Field(default=100.0, gt=0)


class TracingSettings(BaseModel):
    """``[server.tracing]``: OpenTelemetry traces exported over OTLP/gRPC (the ``tracing`` extra)."""

    model_config = ConfigDict(extra="forbid")

    # A span per ext_proc stream and one per plugin hook call (tracing.py); off: nothing is
    # imported and nothing measurable is spent.
    enabled: bool = False
    # The collector's OTLP/gRPC endpoint; http:// for plain gRPC, https:// for TLS.
    endpoint: str = "http://127.0.0.1:4317"
    service_name: str = "extproc-host"
    # Share of the streams that start a trace of their own; a stream whose exchange carries a
    # trace context follows its sampling decision.
    sample_ratio: float = Field(default=1.0, ge=0, le=1)


class ServerSettings(BaseModel):
    """``[server]``: where and how the gRPC server listens."""

    model_config = ConfigDict(extra="forbid")

    listen: str = DEFAULT_LISTEN
    # Above the largest BUFFERED body Envoy may send (envoy/full_duplex.yaml allows 64 MiB).
    max_message_bytes: int = Field(default=128 * 1024 * 1024, ge=4 * 1024 * 1024)
    # On SIGTERM: first drain_seconds reporting NOT_SERVING while still serving new streams,
    # so health checkers take the host out before it refuses any (drain.py; the default
    # matches envoy-config --health-check 2), then grace_seconds for the open streams to finish.
    # A container's stop period must exceed drain_seconds + grace_seconds.
    drain_seconds: float = Field(default=DEFAULT_DRAIN_SECONDS, ge=0)
    grace_seconds: float = Field(default=10.0, ge=0)
    # HTTP/2 receive window per ext_proc stream: how far the host reads ahead of the plugin
    # chain, so the bytes a stream can hold in the host (1 MiB: the host's peak on 10 x 70 MiB
    # uploads 10-20 MiB below 4 MiB's, the same throughput; benchmarks/). 0: with grpcio, gRPC's
    # automatic window (BDP probing), which grows it to many MiB on a fast link (higher and
    # unsteady host memory, no throughput gain); with the builtin server, 1 MiB.
    stream_window_bytes: int = Field(default=1024 * 1024, ge=0, le=1024 * 1024 * 1024)
    # The gRPC server: "builtin", the host's own HTTP/2 server on the event loop (wire/:
    # half grpcio's CPU per small exchange, benchmarks/); "grpcio", grpc.aio (for 0 above, the
    # automatic window, which the builtin server does not probe for: it uses 4 MiB).
    transport: Literal["builtin", "grpcio"] = "builtin"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # "json": one JSON object per line (log collectors); "text": human-readable lines.
    log_format: Literal["text", "json"] = "text"
    # Streams open at once beyond which new ones are refused with RESOURCE_EXHAUSTED (0: no count;
    # the budget below bounds them, docs/operating.md).
    max_concurrent_streams: int = Field(default=0, ge=0)
    # The budget for everything open streams hold (0: no limit): each stream reserves 16 KiB plus
    # its first window (new streams are refused only when reservations would pass it), and the
    # bytes they hold are charged (request messages not yet taken, answers on their way out,
    # observers' queues, windows grown past the first); past it the builtin server gives Envoy
    # no more window until bytes are released: flow control, not refusals.
    max_held_bytes: int = Field(default=256 * 1024 * 1024, ge=0)
    # Longest wait for Envoy's next message on a stream (or for Envoy to take an answer); past
    # it the stream fails with DEADLINE_EXCEEDED (0: no limit).
    idle_timeout_seconds: float = Field(default=300.0, ge=0)
    # Observe-only routes (Envoy's observability mode): how far a stream's chain may fall behind
    # what Envoy sends before the host stops observing that exchange (its plugins are closed
    # with ObserverBehind), so that neither Envoy nor the client ever waits for an observer.
    # These bytes count against max_held_bytes too.
    observe_buffer_bytes: int = Field(default=16 * 1024 * 1024, ge=1024 * 1024)
    # Prometheus exporter "HOST:PORT" (port 0: any free port); None: no metrics.
    metrics_listen: str | None = None
    # uvloop takes 15-30% less host CPU per small request than asyncio's default loop.
    event_loop: Literal["uvloop", "asyncio"] = "uvloop"
    # Modules to load as plugins without installing them (development, tests).
    plugin_modules: list[str] = Field(default_factory=list)
    # Reload the settings file when its content changes, looked at every this many seconds (0:
    # only on SIGHUP): a Kubernetes ConfigMap update reaches the host without a restart.
    watch_config_seconds: float = Field(default=0.0, ge=0)
    # Processes serving one TCP port (SO_REUSEPORT), to use more than one core (workers.py).
    workers: int = Field(default=1, ge=1, le=256)
    # TLS, or mutual TLS with client_ca_file (listeners.py).
    tls: TlsSettings | None = None
    # The builtin server's HTTP/2 limits.
    http2: Http2Settings = Field(default_factory=Http2Settings)
    # OpenTelemetry traces.
    tracing: TracingSettings = Field(default_factory=TracingSettings)

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str) -> str:
        parse_address(value)  # HOST:PORT or unix:/path
        return value

    @field_validator("stream_window_bytes")
    @classmethod
    def _check_window(cls, value: int) -> int:
        if 0 < value < 65535:
            raise ValueError("must be 0 (automatic) or at least 65535, HTTP/2's initial window")
        return value

    @field_validator("metrics_listen")
    @classmethod
    def _check_metrics_listen(cls, value: str | None) -> str | None:
        if value is not None:
            parse_listen(value)
        return value


#: Envoy's ext_proc body modes a route may ask for (``body_mode``).
BodyMode = Literal["NONE", "STREAMED", "BUFFERED", "FULL_DUPLEX_STREAMED"]

#: Parts of an exchange a route may ask Envoy to send whatever its chain needs (``send``).
SendPart = Literal["request_body", "request_trailers", "response_headers", "response_body", "response_trailers"]

#: An Envoy attribute name (``source.address``, ``xds.route_name``, ``response.code``).
_ATTRIBUTE = re.compile(r"[a-z][a-z0-9_]*(\.[a-z0-9_]+)+")
#: A dynamic metadata namespace, an upstream (cluster) name.
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]*")


class BodyModes(BaseModel):
    """``body_mode = { request = "...", response = "..." }``: a body mode per direction."""

    model_config = ConfigDict(extra="forbid")

    request: BodyMode | None = None
    response: BodyMode | None = None


class RouteSettings(BaseModel):
    """``[routes.<name>]``: the plugin chain and failure policy for one Envoy route, and what
    ``extproc-host envoy-config`` asks Envoy to send for it."""

    model_config = ConfigDict(extra="forbid")

    chain: list[str] = Field(min_length=1)
    failure_policy: Literal["fail_closed", "fail_open"] = "fail_closed"
    path_prefix: str | None = None
    plugins: dict[str, dict[str, Any]] = Field(default_factory=dict)
    # envoy-config only: force the body mode (both directions, or per direction)...
    body_mode: BodyMode | BodyModes | None = None
    # ...send these parts whatever the chain needs...
    send: list[SendPart] = Field(default_factory=list)
    # ...and let Envoy hold BUFFERED bodies up to this size on this route.
    buffer_limit_bytes: int | None = Field(default=None, gt=0, le=2**32 - 1)
    # Envoy attributes sent to the host besides the ones the chain's plugins ask for (Needs),
    # by Envoy's names: request ones with the request headers, response ones with the response headers.
    request_attributes: list[str] = Field(default_factory=list)
    response_attributes: list[str] = Field(default_factory=list)
    # Dynamic metadata namespaces Envoy forwards to the host (StreamInfo.metadata) and accepts
    # from it (StreamInfo.set_metadata), besides the ones the chain's plugins declare.
    forwarding_namespaces: list[str] = Field(default_factory=list)
    receiving_namespaces: list[str] = Field(default_factory=list)
    # The chain may tell Envoy, when it answers a header message, to skip a body it does not
    # need (Plugin.skip_body -> ext_proc's mode_override). Streamed bodies then go STREAMED:
    # Envoy ignores mode_override on FULL_DUPLEX_STREAMED.
    allow_mode_override: bool = False
    # Header changes Envoy accepts from the host on this route (Envoy's HeaderMutationRules):
    # required for plugins that change routing headers or x-envoy-* headers.
    mutation_rules: MutationRules | None = None
    # When Envoy picks the route again after the host changed request headers (default: CLEAR
    # when a plugin of the chain re-routes, else DEFAULT: when the host asks).
    route_cache_action: Literal["DEFAULT", "CLEAR", "RETAIN"] | None = None
    # Seconds Envoy waits for each answer on this route (default: envoy-config --message-timeout),
    # and the most a plugin may ask for with StreamInfo.extend_timeout (0: it may not).
    message_timeout: float | None = Field(default=None, gt=0, le=3600)
    max_message_timeout: float = Field(default=0.0, ge=0, le=3600)
    # Envoy's route: the cluster it forwards to ("upstream", or one given to envoy-config as
    # --upstream NAME=HOST:PORT) and request headers it must carry (exact values) to match.
    upstream: str = "upstream"
    match_headers: dict[str, str] = Field(default_factory=dict)

    def forced_body_mode(self, direction: str) -> str | None:
        """The body mode ``body_mode`` forces for ``direction`` ("request"/"response"), if any."""
        if isinstance(self.body_mode, BodyModes):
            forced: str | None = getattr(self.body_mode, direction)
            return forced
        return self.body_mode

    @field_validator("path_prefix")
    @classmethod
    def _check_prefix(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("/"):
            raise ValueError("must start with '/'")
        return value

    @field_validator("request_attributes", "response_attributes")
    @classmethod
    def _check_attributes(cls, value: list[str]) -> list[str]:
        for name in value:
            if not _ATTRIBUTE.fullmatch(name):
                raise ValueError(f"{name!r} is not an Envoy attribute name (like 'source.address')")
        return value

    @field_validator("forwarding_namespaces", "receiving_namespaces", "upstream")
    @classmethod
    def _check_names(cls, value: str | list[str]) -> str | list[str]:
        for name in [value] if isinstance(value, str) else value:
            if not _NAME.fullmatch(name):
                raise ValueError(f"{name!r}: use letters, digits and '_', '.', ':', '-'")
        return value

    @field_validator("match_headers")
    @classmethod
    def _check_match_headers(cls, value: dict[str, str]) -> dict[str, str]:
        return {name.lower(): header_value for name, header_value in value.items()}


class Settings(BaseSettings):
    """The whole settings file."""

    model_config = SettingsConfigDict(env_prefix="EXTPROC_", env_nested_delimiter="__", extra="forbid")

    server: ServerSettings = Field(default_factory=ServerSettings)
    routes: dict[str, RouteSettings] = Field(default_factory=lambda: {"default": RouteSettings(chain=["passthrough"])})
    plugins: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = _toml_file.get()
        if path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)


def format_location(loc: tuple[Any, ...]) -> str:
    """``("routes", "x", "chain", 0)`` -> ``routes.x.chain[0]``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def describe_validation_error(source: str, error: ValidationError, prefix: tuple[Any, ...] = ()) -> str:
    """One readable paragraph for a pydantic error: file, key and problem for each."""
    lines = []
    for item in error.errors():
        key = format_location(prefix + tuple(item["loc"]))
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        elif item["type"] == "missing":
            message = "required key is missing"
        elif item["type"] == "value_error":
            message = message.removeprefix("Value error, ")
        lines.append(f"{source}: key '{key}'{environment_origin(prefix + tuple(item['loc']))}: {message}")
    return "\n".join(lines)


def environment_origin(loc: tuple[Any, ...]) -> str:
    """`` (set by environment variable NAME)`` when the environment sets the key at ``loc`` or
    a key under it, else ``""``: the file is not where to look for it. A ``-`` in a plugin name
    is ``_`` in the variable's name (``EXTPROC_PLUGINS__ADD_HEADER__NAME``), as a shell writes it."""
    name = "EXTPROC_" + "__".join(str(p) for p in loc if not isinstance(p, int)).upper().replace("-", "_")
    found = sorted(var for var in os.environ if var.upper() == name or var.upper().startswith(name + "__"))
    return f" (set by environment variable {', '.join(found)})" if found else ""


def load_settings(path: str | Path | None) -> Settings:
    """Read ``path`` (or defaults only, when None) plus the environment; ConfigError on any problem."""
    source = str(path) if path is not None else "environment"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{source}: settings file not found")
        try:
            with path.open("rb") as fh:
                tomllib.load(fh)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{source}: not valid TOML: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"{source}: cannot read: {exc.strerror}") from None
    token = _toml_file.set(path)
    try:
        settings = Settings()
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(source, exc)) from None
    finally:
        _toml_file.reset(token)
    return settings
