"""Files shipped inside the package, so every command works without a source checkout:
``demo.toml`` (the demo's settings, the same as config/full_duplex.toml in a checkout) and
``starter.toml`` (what ``extproc-host init`` writes)."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

#: The demo's host settings: routes in every body mode, file_tee on full-duplex-streamed.
DEMO_SETTINGS = "demo.toml"
#: The commented starter settings file ``extproc-host init`` writes.
STARTER_SETTINGS = "starter.toml"


def data_path(name: str) -> Path:
    """The path of a shipped data file (the package is installed as files, never zipped)."""
    return Path(str(files(__name__) / name))


def data_text(name: str) -> str:
    """The text of a shipped data file."""
    return (files(__name__) / name).read_text(encoding="utf-8")
