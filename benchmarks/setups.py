"""The setups a benchmark compares and how each one's stack is started.

- ``direct``: envoy/direct.yaml, no ext_proc filter, Envoy -> echo (the ceiling);
- ``minimal``: envoy/full_duplex.yaml -> benchmarks/minimal_passthrough.py (the bar);
- ``host`` and plugin or worker setups: envoy/full_duplex.yaml (or the Envoy config generated
  from the setup's settings) -> extproc-host with a :class:`HostSetup`'s settings file;
- ``base`` (``--baseline REV``): the ``host`` setup served by the code of another git revision
  (:func:`extract_revision`), to measure a change against what it changes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import ROOT, ROUTES, WORKLOAD_PATHS
from extproc_host.stack import Stack, project_path

SETUPS = ("direct", "minimal", "host")
MINIMAL_SERVER = Path(__file__).resolve().parent / "minimal_passthrough.py"
# Environment variables that hand the benchmark's own paths to plugins (pydantic-settings maps
# EXTPROC_PLUGINS__X__Y to [plugins.x] y, over the TOML file's value).
TEE_DIRECTORY_ENV = "EXTPROC_PLUGINS__FILE_TEE__DIRECTORY"
REPLACE_RESPONSE_ENV = "EXTPROC_PLUGINS__REPLACE__RESPONSE_FILE"
# With --host-workers: streams Envoy puts on one connection to the host before opening another.
WORKER_STREAMS_PER_CONNECTION = 8


@dataclass
class HostSetup:
    """An extproc-host setup (``host`` or a plugin setup) and what its settings file asks of the
    benchmark, read from the TOML's chains: which plugins run on the routes the workloads use."""

    name: str
    config: Path
    chains: dict[str, list[str]] = field(default_factory=dict)
    plugin_settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    workers: int = 1
    #: --generate-envoy: Envoy config generated from ``config``; None: envoy/full_duplex.yaml.
    envoy_config: Path | None = None
    #: The settings load plugin modules from this checkout ([server] plugin_modules).
    loads_modules: bool = False
    #: Serve with the code found here (extract_revision) instead of the installed package's.
    code: Path | None = None

    @classmethod
    def load(cls, name: str, config: str | os.PathLike[str]) -> HostSetup:
        """The setup ``name`` running the settings file ``config``."""
        path = project_path(config)
        with path.open("rb") as fh:
            data = tomllib.load(fh)
        routes = data.get("routes") or {"default": {"chain": ["passthrough"]}}
        chains = {route: list(table.get("chain", [])) for route, table in routes.items()}
        modules = bool(data.get("server", {}).get("plugin_modules"))
        return cls(name, path, chains, dict(data.get("plugins", {})), loads_modules=modules)

    def chain_for(self, path: str) -> list[str]:
        """The chain the host runs for requests to ``path`` (the host's route or its default)."""
        return self.chains.get(ROUTES[path], self.chains.get("default", ["passthrough"]))

    def uses(self, plugin: str) -> bool:
        """Whether any route's chain runs ``plugin``."""
        return any(plugin in chain for chain in self.chains.values())

    @property
    def tees(self) -> bool:
        """The chains use file_tee: the stack gets a fresh tee directory."""
        return self.uses("file_tee")

    @property
    def replaces_with_upload(self) -> bool:
        """The chains use replace and the file sets no response_file: the benchmark sets it to the
        upload file, so the replaced responses must be that file."""
        return self.uses("replace") and "response_file" not in self.plugin_settings.get("replace", {})

    def response_is_upload(self, path: str) -> bool:
        """Requests to ``path`` get the upload file back instead of their own body."""
        return self.replaces_with_upload and "replace" in self.chain_for(path)

    def skips(self, workload: str) -> str | None:
        """Why this setup does not run ``workload`` (None: it runs it)."""
        small = workload != "upload"
        if small and any(self.response_is_upload(path) for path in WORKLOAD_PATHS[workload]):
            return "every small POST would get the whole upload file back"
        return None

    def describe(self) -> dict[str, Any]:
        """The setup as plain JSON types, for the results file."""
        return {
            "config": str(self.config),
            "chains": self.chains,
            "plugins": self.plugin_settings,
            "workers": self.workers,
        }


def make_stack(
    setup: str,
    host: HostSetup | None,
    *,
    envoy_concurrency: int,
    split_connections: bool,
    upload_file: Path | None,
    tee_dir: Path | None,
) -> Stack:
    """Start the stack of ``setup`` (``host`` is its HostSetup for extproc-host setups)."""
    common: dict[str, Any] = {"concurrency": envoy_concurrency}
    if setup == "direct":
        return Stack("envoy/direct.yaml", host_config=None, **common)
    if setup == "minimal":
        command = [sys.executable, str(MINIMAL_SERVER), "--listen", "127.0.0.1:0"]
        return Stack("envoy/full_duplex.yaml", host_command=command, **common)
    assert host is not None, f"setup {setup} needs its HostSetup"
    env = {}
    if tee_dir is not None:
        env[TEE_DIRECTORY_ENV] = str(tee_dir)
    if host.replaces_with_upload:
        assert upload_file is not None
        env[REPLACE_RESPONSE_ENV] = str(upload_file)
    if host.workers != 1:
        common["host_args"] = ["--workers", str(host.workers)]
    if split_connections:
        common["envoy_edit"] = limit_extproc_streams
    path = []
    if host.code is not None:  # another revision's code: its packages first on the import path
        path.append(str(host.code))  # (PYTHONPATH: the workers of --workers N import it too)
    if host.loads_modules:
        path.append(str(ROOT))  # plugin_modules such as benchmarks.response_plugins
    if path:
        env["PYTHONPATH"] = os.pathsep.join(path)
    envoy_config = host.envoy_config or "envoy/full_duplex.yaml"
    return Stack(envoy_config, host_config=host.config, host_env=env, **common)


def extract_revision(revision: str, directory: Path) -> Path:
    """The host and the built-in plugins of git ``revision``, extracted under ``directory`` and
    importable as ``extproc_host`` and ``extproc_host_plugins`` from the returned path."""
    tree = directory / "tree"
    tree.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision, "host", "plugins"], capture_output=True)
    if archive.returncode != 0:
        raise SystemExit(f"--baseline {revision}: git archive failed: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    site = directory / "site"
    site.mkdir()
    (site / "extproc_host").symlink_to(tree / "host")
    (site / "extproc_host_plugins").symlink_to(tree / "plugins")
    return site


def generate_envoy_configs(host_setups: Mapping[str, HostSetup], directory: Path) -> None:
    """--generate-envoy: each host setup's Envoy config, from its own settings file."""
    for name, host in host_setups.items():
        out = directory / f"envoy-{name}.yaml"
        cmd = [sys.executable, "-m", "extproc_host", "envoy-config", "--config", str(host.config), "-o", str(out)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("EXTPROC_")}
        env["PYTHONPATH"] = str(ROOT)
        result = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if result.returncode != 0:
            raise SystemExit(f"envoy-config failed for setup {name}:\n{result.stderr}")
        host.envoy_config = out


def limit_extproc_streams(config: dict[str, Any]) -> None:
    """Envoy edit: at most WORKER_STREAMS_PER_CONNECTION streams per connection to the host, so
    that concurrent exchanges open several connections for SO_REUSEPORT to spread."""
    for cluster in config["static_resources"]["clusters"]:
        if cluster["name"] == "extproc":
            options = cluster["typed_extension_protocol_options"][
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
            ]
            h2 = options["explicit_http_config"]["http2_protocol_options"]
            h2["max_concurrent_streams"] = WORKER_STREAMS_PER_CONNECTION
