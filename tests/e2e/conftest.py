"""Fixtures for the end-to-end tests: a live stack (echo + extproc-host + Envoy) shared by the
session, and deterministic test bodies in files (see e2e_clients.py for the clients)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from e2e_clients import Payload, write_payload

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
def stack() -> Iterator[Stack]:
    """Echo + extproc-host (config/full_duplex.toml) + Envoy (envoy/full_duplex.yaml)."""
    with Stack("envoy/full_duplex.yaml", "config/full_duplex.toml") as running:
        yield running
