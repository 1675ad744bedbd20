"""Fixtures for the end-to-end tests: a live stack (echo + extproc-host + Envoy) shared by the
session, and deterministic test bodies in files (see e2e_clients.py for the clients)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_clients import Payload, write_payload
from installed import Installed, install_fresh

from extproc_host.stack import Stack


@pytest.fixture(scope="session")
def payload(tmp_path_factory: pytest.TempPathFactory):
    """``payload(size) -> Payload``: a deterministic body of ``size`` bytes in a file."""
    directory = tmp_path_factory.mktemp("payloads")
    made: dict[int, Payload] = {}

    def get(size: int) -> Payload:
        if size not in made:
            made[size] = write_payload(directory / f"body-{size}.bin", size)
        return made[size]

    return get


@pytest.fixture(scope="session")
def tee_directory(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the session stack's file_tee (route full-duplex-streamed) writes its copies."""
    return tmp_path_factory.mktemp("tee")


@pytest.fixture(scope="session")
def stack(tee_directory: Path) -> Iterator[Stack]:
    """Echo + extproc-host (config/full_duplex.toml) + Envoy (envoy/full_duplex.yaml); the
    config's file_tee writes to ``tee_directory`` instead of ./temp."""
    env = {"EXTPROC_PLUGINS__FILE_TEE__DIRECTORY": str(tee_directory)}
    with Stack("envoy/full_duplex.yaml", "config/full_duplex.toml", host_env=env) as running:
        yield running


@pytest.fixture(autouse=True)
def _clear_tee_files(tee_directory: Path) -> Iterator[None]:
    """After each test, delete the body copies the session stack left (10 x 70 MiB uploads
    copy 1.4 GB)."""
    yield
    for path in tee_directory.iterdir():
        path.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """The project's wheel installed with the demo and testing extras in a fresh virtual
    environment outside the checkout, and an empty working directory."""
    return install_fresh(tmp_path_factory.mktemp("installed"))
