"""Routing by path prefix through a real Envoy whose ext_proc filter sends no attributes:
the host cannot learn the Envoy route name, so ``path_prefix`` picks the chain."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from extproc_host.stack import Stack

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]

HOST_CONFIG = """
[server]
plugin_modules = ["tests.unit.sample_plugins"]

[routes.shouting]
chain = ["upper"]
path_prefix = "/full-duplex-streamed/shout"

[routes.default]
chain = ["passthrough"]
"""


def without_attributes(template: Path, out: Path) -> Path:
    config = yaml.safe_load(template.read_text())
    removed = 0
    for listener in config["static_resources"]["listeners"]:
        for chain in listener["filter_chains"]:
            for net_filter in chain["filters"]:
                for http_filter in net_filter["typed_config"].get("http_filters", []):
                    removed += http_filter["typed_config"].pop("request_attributes", None) is not None
    assert removed == 1
    out.write_text(yaml.safe_dump(config))
    return out


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("by-path")
    envoy_config = without_attributes(ROOT / "envoy/full_duplex.yaml", tmp / "envoy.yaml")
    host_config = tmp / "host.toml"
    host_config.write_text(HOST_CONFIG)
    with Stack(envoy_config, host_config, host_env={"PYTHONPATH": str(ROOT)}) as running:
        yield running


def test_path_prefix_picks_the_chain(stack):
    import httpx

    body = b"route me by my path " * 5000
    shouted = httpx.post(stack.url + "/full-duplex-streamed/shout/here", content=body, timeout=30)
    assert shouted.status_code == 200
    assert shouted.content == body.upper()  # upper-cased on the way up (and again, harmlessly, back)
    plain = httpx.post(stack.url + "/full-duplex-streamed/quiet", content=body, timeout=30)
    assert plain.status_code == 200
    assert plain.content == body
