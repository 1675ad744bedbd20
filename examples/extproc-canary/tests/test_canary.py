"""The canary plugin's own tests, with extproc-host's kit: in process with the whole route
table (the kit picks the route again as Envoy does), and behind a real Envoy with two upstreams."""

from __future__ import annotations

import os
from pathlib import Path

import extproc_canary
import httpx
from extproc_canary import bucket

from extproc_host.testing import PluginRunner, request, response

SETTINGS = {
    "server": {"plugin_modules": ["extproc_canary"]},
    "routes": {
        "default": {"chain": ["canary"]},
        "canary": {"chain": ["canary"], "match_headers": {"x-upstream": "canary"}, "upstream": "canary"},
    },
    "plugins": {"canary": {"percent": 30, "users": ["alice"]}},
}
UPSTREAMS = {"canary": response(b"canary"), "upstream": response(b"stable")}


def test_users_land_on_their_side_every_time() -> None:
    runner = PluginRunner.from_settings(SETTINGS)
    sides = {}
    for user in ["alice", *(f"user-{n}" for n in range(40))]:
        result = runner.exchange(request(headers={"x-user": user}), upstreams=UPSTREAMS)
        again = runner.exchange(request(headers={"x-user": user}), upstreams=UPSTREAMS)
        assert result.upstream_cluster == again.upstream_cluster
        sides[user] = result.client.body
    assert sides["alice"] == b"canary"
    expected = {user: b"canary" if user == "alice" or bucket(user) < 30 else b"stable" for user in sides}
    assert sides == expected
    assert b"stable" in sides.values()


def test_a_client_cannot_pick_the_canary() -> None:
    runner = PluginRunner.from_settings(SETTINGS)
    result = runner.exchange(request(headers={"x-upstream": "canary", "x-user": "user-1"}), upstreams=UPSTREAMS)
    if bucket("user-1") >= 30:
        assert result.route == "default"
        assert result.upstream.header("x-upstream") is None
    anonymous = runner.exchange(request(headers={"x-upstream": "canary"}), upstreams=UPSTREAMS)
    assert anonymous.route == "default"


def test_behind_a_real_envoy_with_two_upstreams(envoy_stack) -> None:
    settings = (
        '[server]\nplugin_modules = ["extproc_canary"]\n'
        '[routes.default]\nchain = ["canary"]\n'
        '[routes.canary]\nchain = ["canary"]\nmatch_headers = { "x-upstream" = "canary" }\nupstream = "canary"\n'
        '[plugins.canary]\npercent = 0\nusers = ["alice"]\n'
    )
    src = str(Path(extproc_canary.__file__).resolve().parents[1])
    path = os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))
    stack = envoy_stack(settings, host_env={"PYTHONPATH": path}, upstreams=["canary"])
    alice = httpx.post(stack.url + "/", content=b"hi", headers={"x-user": "alice"})
    bob = httpx.post(stack.url + "/", content=b"hi", headers={"x-user": "bob", "x-upstream": "canary"})
    assert (alice.status_code, alice.headers["x-upstream"], alice.content) == (200, "canary", b"hi")
    assert (bob.status_code, bob.headers["x-upstream"], bob.content) == (200, "upstream", b"hi")
