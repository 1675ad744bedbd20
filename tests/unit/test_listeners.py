"""Listen addresses and TLS settings: parsing and the errors a wrong file gets."""

from __future__ import annotations

from pathlib import Path

import pytest
import trustme

from extproc_host.cli import main
from extproc_host.listeners import ListenAddress, parse_address
from extproc_host.settings import ConfigError, load_settings


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.1:9001", ListenAddress("127.0.0.1", 9001)),
        ("[::1]:0", ListenAddress("::1", 0)),
        ("0.0.0.0:65535", ListenAddress("0.0.0.0", 65535)),
        ("unix:/run/x.sock", ListenAddress(path="/run/x.sock")),
        ("unix:///run/x.sock", ListenAddress(path="/run/x.sock")),
    ],
)
def test_parse_address(value: str, expected: ListenAddress) -> None:
    assert parse_address(value) == expected


def test_relative_unix_path_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert parse_address("unix:h.sock").path == str(tmp_path / "h.sock")


@pytest.mark.parametrize("value", ["nowhere", "host:", ":9001", "h:70000", "unix:", "unix:/" + "x" * 120])
def test_bad_addresses(value: str) -> None:
    with pytest.raises(ValueError):
        parse_address(value)


def test_targets() -> None:
    assert parse_address("[::1]:9001").target() == "[::1]:9001"
    assert parse_address("unix:/a/b.sock").target() == "unix:/a/b.sock"


@pytest.fixture(scope="module")
def pems(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("pems")
    ca = trustme.CA()
    one, two = ca.issue_cert("one.test"), ca.issue_cert("two.test")
    paths = {name: directory / f"{name}.pem" for name in ("ca", "cert", "key", "other_key")}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    one.cert_chain_pems[0].write_to_path(str(paths["cert"]))
    one.private_key_pem.write_to_path(str(paths["key"]))
    two.private_key_pem.write_to_path(str(paths["other_key"]))
    return paths


def _settings_file(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "host.toml"
    path.write_text(body)
    return path


def test_tls_settings_load(tmp_path: Path, pems: dict[str, Path]) -> None:
    path = _settings_file(
        tmp_path,
        f'[server.tls]\ncert_file = "{pems["cert"]}"\nkey_file = "{pems["key"]}"\nclient_ca_file = "{pems["ca"]}"\n',
    )
    tls = load_settings(path).server.tls
    assert tls is not None and tls.client_ca_file == str(pems["ca"])
    assert tls.credentials() is not None


@pytest.mark.parametrize(
    ("body", "key", "problem"),
    [
        ('cert_file = "{missing}"\nkey_file = "{key}"', "server.tls.cert_file", "file not found"),
        ('cert_file = "{cert}"\nkey_file = "{missing}"', "server.tls.key_file", "file not found"),
        (
            'cert_file = "{cert}"\nkey_file = "{key}"\nclient_ca_file = "{missing}"',
            "server.tls.client_ca_file",
            "file not found",
        ),
        ('cert_file = "{cert}"', "server.tls.key_file", "required key is missing"),
        ('cert_file = "{cert}"\nkey_file = "{other_key}"', "server.tls", "not a matching PEM certificate and key"),
        ('cert_file = "{key}"\nkey_file = "{key}"', "server.tls", "not a matching PEM certificate and key"),
        (
            'cert_file = "{cert}"\nkey_file = "{key}"\nclient_ca_file = "{key}"',
            "server.tls",
            "client_ca_file is not a PEM certificate",
        ),
        ('cert_file = "{cert}"\nkey_file = "{key}"\nca = "x"', "server.tls.ca", "unknown key"),
    ],
)
def test_bad_tls_settings(tmp_path: Path, pems: dict[str, Path], body: str, key: str, problem: str) -> None:
    text = "[server.tls]\n" + body.format(missing=tmp_path / "nope.pem", **pems) + "\n"
    path = _settings_file(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    message = str(caught.value)
    assert f"{path}: key '{key}'" in message
    assert problem in message


def test_bad_tls_settings_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _settings_file(tmp_path, f'[server.tls]\ncert_file = "{tmp_path}/c.pem"\nkey_file = "{tmp_path}/k.pem"\n')
    assert main(["check", "--config", str(path)]) == 2
    assert "server.tls.cert_file" in capsys.readouterr().err


def test_workers_setting_is_validated(tmp_path: Path) -> None:
    path = _settings_file(tmp_path, "[server]\nworkers = 0\n")
    with pytest.raises(ConfigError, match=r"key 'server.workers'"):
        load_settings(path)


def test_unix_listen_setting(tmp_path: Path) -> None:
    path = _settings_file(tmp_path, '[server]\nlisten = "unix:/run/extproc.sock"\n')
    assert load_settings(path).server.listen == "unix:/run/extproc.sock"


def test_worker_metrics_ports_follow_the_configured_port() -> None:
    from extproc_host.workers import worker_metrics_listen

    assert [worker_metrics_listen("0.0.0.0:9100", i) for i in range(3)] == [
        "0.0.0.0:9100",
        "0.0.0.0:9101",
        "0.0.0.0:9102",
    ]
    assert worker_metrics_listen("127.0.0.1:0", 1) == "127.0.0.1:0"
    assert worker_metrics_listen("[::1]:9100", 1) == "[::1]:9101"
