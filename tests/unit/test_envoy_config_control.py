"""``extproc-host envoy-config`` for the control half: what each route's chain declares and
its settings add becomes Envoy's attributes, metadata options, mutation rules, route cache
action, mode overrides and timeouts; routes that differ in filter-only options get a filter
each, enabled on them only; routes match headers and forward to named upstreams; the access
log prints the metadata routes receive. And the settings it refuses."""

from __future__ import annotations

from pathlib import Path

import pytest

from extproc_host.stack import validate_envoy_config

from .test_envoy_config import EXT_PROC, cluster, manager, refuse, render, routes

pytestmark = pytest.mark.usefixtures("no_extproc_env")

SETTINGS = """
[routes.audit]
chain = ["auditor"]
path_prefix = "/audit"

[routes.json]
chain = ["streamer"]
path_prefix = "/json"
allow_mode_override = true
message_timeout = 2.5
max_message_timeout = 20

[routes.canary]
chain = ["router"]
match_headers = { "x-upstream" = "canary" }
upstream = "canary"
mutation_rules = { allow_all_routing = true }

[routes.default]
chain = ["router"]
mutation_rules = { allow_all_routing = true }
"""


def filters(bootstrap: dict) -> dict[str, dict]:
    return {f["name"]: f.get("typed_config", {}) for f in manager(bootstrap)["http_filters"]}


def per_route(bootstrap: dict, route: str) -> dict[str, dict]:
    (entry,) = [r for r in routes(bootstrap) if r["name"] == route]
    return entry.get("typed_per_filter_config", {})


@pytest.fixture
def bootstrap(tmp_path: Path) -> dict:
    return render(tmp_path, SETTINGS, "--upstream", "canary=10.0.0.6:8080", "--access-log", "/dev/stdout")


def test_routes_with_their_own_filter_options_get_a_filter_each(bootstrap: dict) -> None:
    found = filters(bootstrap)
    assert list(found) == [EXT_PROC, f"{EXT_PROC}.audit", f"{EXT_PROC}.json", "envoy.filters.http.router"]
    # Each route enables exactly one of them.
    for route, serving in (("audit", f"{EXT_PROC}.audit"), ("json", f"{EXT_PROC}.json"), ("default", EXT_PROC)):
        configs = per_route(bootstrap, route)
        assert [name for name, c in configs.items() if not c.get("disabled")] in ([serving], [])
        assert {name for name, c in configs.items() if c.get("disabled")} == set(found) - {
            serving,
            "envoy.filters.http.router",
        }


def test_attributes_and_metadata_namespaces_come_from_the_chain(bootstrap: dict) -> None:
    audit = filters(bootstrap)[f"{EXT_PROC}.audit"]
    assert audit["request_attributes"] == ["xds.route_name", "source.address"]
    assert audit["response_attributes"] == ["response.code"]
    options = per_route(bootstrap, "audit")[f"{EXT_PROC}.audit"]["overrides"]["metadata_options"]
    assert options == {
        "forwarding_namespaces": {"untyped": ["envoy.filters.http.jwt_authn"]},
        "receiving_namespaces": {"untyped": ["acme.audit"]},
    }


def test_a_chain_that_reroutes_gets_mutation_rules_and_route_cache_clearing(bootstrap: dict) -> None:
    main = filters(bootstrap)[EXT_PROC]
    assert main["mutation_rules"] == {"allow_all_routing": True}
    assert main["route_cache_action"] == "CLEAR"
    (canary,) = [r for r in routes(bootstrap) if r["name"] == "canary"]
    assert canary["match"] == {"prefix": "/", "headers": [{"name": "x-upstream", "string_match": {"exact": "canary"}}]}
    assert canary["route"]["cluster"] == "canary"
    assert cluster(bootstrap, "canary")["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"][
        "address"
    ] == {"socket_address": {"address": "10.0.0.6", "port_value": 8080}}
    # The canary route comes before default (same prefix, more headers).
    assert [r["name"] for r in routes(bootstrap)][-2:] == ["canary", "default"]


def test_mode_overrides_get_a_filter_whose_mode_is_the_routes_and_the_allowed_overrides(bootstrap: dict) -> None:
    json_filter = filters(bootstrap)[f"{EXT_PROC}.json"]
    assert json_filter["allow_mode_override"] is True
    assert json_filter["processing_mode"]["request_body_mode"] == "STREAMED"  # never FULL_DUPLEX_STREAMED
    skipped = [m for m in json_filter["allowed_override_modes"] if m.get("request_body_mode", "NONE") == "NONE"]
    assert skipped and all(m["request_trailer_mode"] == "SKIP" for m in skipped)
    assert json_filter["message_timeout"] == "2.500s"
    assert json_filter["max_message_timeout"] == "20s"


def test_the_access_log_prints_every_received_namespace(bootstrap: dict) -> None:
    (log,) = manager(bootstrap)["access_log"]
    fields = log["typed_config"]["log_format"]["json_format"]
    assert fields["metadata"] == {"acme.audit": "%DYNAMIC_METADATA(acme.audit)%"}
    assert fields["upstream_cluster"] == "%UPSTREAM_CLUSTER%"


def test_envoy_validates_it(tmp_path: Path) -> None:
    render(tmp_path, SETTINGS, "--upstream", "canary=10.0.0.6:8080", "--access-log", "/dev/stdout")
    validate_envoy_config(tmp_path / "envoy.yaml")  # what render wrote; StackError with Envoy's words


def test_settings_without_control_options_keep_one_filter(tmp_path: Path) -> None:
    plain = render(tmp_path, '[routes.default]\nchain = ["streamer"]\n')
    assert list(filters(plain)) == [EXT_PROC, "envoy.filters.http.router"]
    assert "mutation_rules" not in filters(plain)[EXT_PROC]
    assert "access_log" not in manager(plain)


def test_check_prints_what_each_route_exchanges_besides_the_messages(tmp_path: Path, capsys) -> None:
    from extproc_host.cli import main

    from .test_envoy_config import HEAD

    config = tmp_path / "settings.toml"
    config.write_text(HEAD + SETTINGS)
    assert main(["check", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "route canary (x-upstream: canary) to canary: router" in out
    assert (
        "also: attributes source.address, response.code; metadata forwarded envoy.filters.http.jwt_authn; "
        "metadata received acme.audit" in out
    )
    assert "also: mode overrides allowed; message timeout 2.5 s; plugins may ask for up to 20 s" in out
    assert "also: mutation rules allow_all_routing = True; route cache CLEAR" in out


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            '[routes.default]\nchain = ["router"]\n',
            "key 'routes.default.mutation_rules': 'router' changes routing headers",
        ),
        (
            '[routes.default]\nchain = ["router"]\nmutation_rules = { allow_all_routing = true }\nroute_cache_action = "RETAIN"\n',
            "RETAIN, but 'router' re-routes",
        ),
        (
            '[routes.default]\nchain = ["streamer"]\nallow_mode_override = true\nbody_mode = "FULL_DUPLEX_STREAMED"\n',
            "which Envoy ignores in FULL_DUPLEX_STREAMED",
        ),
        (
            '[routes.x]\nchain = ["streamer"]\nmatch_headers = { "a" = "1" }\nupstream = "other"\n[routes.default]\nchain = ["streamer"]\n',
            "'other' has no address: envoy-config --upstream other=HOST:PORT",
        ),
        (
            '[routes.default]\nchain = ["streamer"]\nmatch_headers = { "a" = "1" }\n',
            "'default' takes every request no other route matches",
        ),
        (
            '[routes.a]\nchain = ["streamer"]\npath_prefix = "/a"\nmatch_headers = { "x" = "1" }\n'
            '[routes.b]\nchain = ["streamer"]\npath_prefix = "/a"\nmatch_headers = { "x" = "1" }\n'
            '[routes.default]\nchain = ["streamer"]\n',
            "with the same match_headers is also route 'a''s match",
        ),
        (
            '[routes.default]\nchain = ["streamer"]\nmutation_rules = { allow_expression = "(" }\n',
            "not a regular expression",
        ),
        (
            '[routes.default]\nchain = ["streamer"]\nrequest_attributes = ["Not An Attribute"]\n',
            "is not an Envoy attribute name",
        ),
    ],
)
def test_settings_it_refuses(tmp_path: Path, capsys, settings: str, message: str) -> None:
    assert message in refuse(tmp_path, settings, capsys)
