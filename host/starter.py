"""``extproc-host init``: a commented starter settings file in the current directory."""

from __future__ import annotations

from pathlib import Path

from .data import STARTER_SETTINGS, data_text

#: The file ``init`` writes, and the one ``--envoy`` writes next to it.
SETTINGS_NAME = "extproc-host.toml"
ENVOY_NAME = "envoy.yaml"
#: Envoy's listener in the ``envoy.yaml`` that ``init --envoy`` writes.
LOOPBACK_ENVOY = "127.0.0.1:18080"


class WouldOverwrite(Exception):
    """A file ``init`` would write already exists (and ``--force`` was not given)."""


def check_free(paths: list[Path], force: bool) -> None:
    """Raise WouldOverwrite naming the first of ``paths`` that exists, unless ``force``."""
    if force:
        return
    for path in paths:
        if path.exists():
            raise WouldOverwrite(f"{path} exists; --force overwrites it")


def write_starter(path: Path) -> Path:
    """Write the starter settings (shipped as package data) to ``path``."""
    path.write_text(data_text(STARTER_SETTINGS), encoding="utf-8")
    return path
