"""Fixtures shared by the unit and end-to-end tests."""

from __future__ import annotations

import os

import pytest


@pytest.fixture
def no_extproc_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Remove every EXTPROC_* variable: what a settings file renders to must depend on the file alone."""
    for name in list(os.environ):
        if name.startswith("EXTPROC_"):
            monkeypatch.delenv(name)
