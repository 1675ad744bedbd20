"""The ``tracing`` extra next to xds-protos: both ship ``opentelemetry/proto/`` (xds-protos a
2021 copy, grpc/grpc#42926), and whichever pip installs last owns the files. ``make venv``
installs opentelemetry-proto again last; a host whose copy was overwritten says how to repair it."""

from __future__ import annotations

import base64
import hashlib
import sys
import types
from importlib.metadata import PackageNotFoundError, files, version

import pytest

from extproc_host.tracing import sdk_missing

COMMON = "opentelemetry.proto.common.v1.common_pb2"


def test_the_environment_has_opentelemetry_protos_own_files() -> None:
    recorded = [f for f in files("opentelemetry-proto") or [] if f.hash and f.name.endswith("_pb2.py")]
    assert len(recorded) >= 8  # common, resource, trace, logs, metrics, profiles and their services
    changed = []
    for record in recorded:
        digest = base64.urlsafe_b64encode(hashlib.sha256(record.read_binary()).digest()).rstrip(b"=").decode()
        if digest != record.hash.value:  # type: ignore[union-attr]
            changed.append(str(record))
    assert not changed, f"overwritten since opentelemetry-proto installed them: {changed[:5]}"


def test_overwritten_protos_are_named_with_the_command_that_puts_them_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, COMMON, types.ModuleType(COMMON))  # common.proto without InstrumentationScope
    message = sdk_missing(ImportError("cannot import name 'InstrumentationScope'"))
    assert "xds-protos" in message
    assert f"pip install --force-reinstall --no-deps opentelemetry-proto=={version('opentelemetry-proto')}" in message


def not_installed(name: str) -> str:
    raise PackageNotFoundError(name)


def test_a_missing_sdk_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("extproc_host.tracing.version", not_installed)
    message = sdk_missing(ImportError("No module named 'opentelemetry.sdk'"))
    assert "pip install 'extproc-host[tracing]'" in message
    assert "No module named 'opentelemetry.sdk'" in message


def test_check_refuses_a_settings_file_whose_traces_cannot_start(
    tmp_path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from extproc_host.cli import main

    config = tmp_path / "host.toml"
    config.write_text('[server.tracing]\nenabled = true\n[routes.default]\nchain = ["passthrough"]\n')
    assert main(["check", "--config", str(config)]) == 0
    assert "traces: OTLP/gRPC to http://127.0.0.1:4317, sample_ratio 1" in capsys.readouterr().out

    # The extra not installed: no SDK, no opentelemetry-proto (only xds-protos' copy of its modules).
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)
    monkeypatch.setattr("extproc_host.tracing.version", not_installed)
    assert main(["check", "--config", str(config)]) == 2
    assert "pip install 'extproc-host[tracing]'" in capsys.readouterr().err
