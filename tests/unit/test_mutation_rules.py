"""Envoy's header mutation rules as the kit applies them (extproc_host.mutation_rules.check),
case by case as Envoy's Checker decides (mutation_rules.cc)."""

from __future__ import annotations

import pytest

from extproc_host.mutation_rules import MutationRules, check

DEFAULT = MutationRules()


@pytest.mark.parametrize(
    ("rules", "op", "name", "value", "verdict"),
    [
        (DEFAULT, "set", "x-plain", "1", "ok"),
        (DEFAULT, "set", ":path", "/new", "ok"),  # not a routing header: a rewrite is allowed
        (DEFAULT, "set", ":authority", "a.example", "ignore"),
        (DEFAULT, "set", "host", "a.example", "ignore"),
        (DEFAULT, "set", ":method", "PUT", "ignore"),
        (DEFAULT, "set", "x-envoy-retry-on", "5xx", "ignore"),
        (DEFAULT, "remove", ":path", "", "ignore"),
        (DEFAULT, "remove", "host", "", "ignore"),
        (DEFAULT, "append", ":path", "/b", "ignore"),  # a ':' header has one value
        (DEFAULT, "set", ":status", "199", "ignore"),
        (DEFAULT, "set", ":status", "503", "ok"),
        (DEFAULT, "set", "x-bad", "a\r\nb", "ignore"),
        (MutationRules(allow_all_routing=True), "set", ":authority", "a.example", "ok"),
        (MutationRules(allow_all_routing=True), "set", ":authority", "not a host", "ignore"),
        (MutationRules(allow_all_routing=True), "remove", ":authority", "", "ignore"),  # never
        (MutationRules(allow_all_routing=True), "set", ":scheme", "ftp", "ignore"),
        (MutationRules(allow_envoy=True), "set", "x-envoy-retry-on", "5xx", "ok"),
        (MutationRules(disallow_system=True), "set", ":path", "/new", "ignore"),
        (MutationRules(disallow_all=True), "set", "x-plain", "1", "ignore"),
        (MutationRules(disallow_all=True, allow_expression="x-ok-.*"), "set", "x-ok-1", "1", "ok"),
        (MutationRules(disallow_expression="x-secret.*"), "set", "x-secret-key", "1", "ignore"),
        (MutationRules(disallow_expression="x-secret.*", allow_expression="x-.*"), "set", "x-secret", "1", "ignore"),
        (MutationRules(disallow_is_error=True), "set", "host", "a.example", "fail"),
        (MutationRules(disallow_is_error=True), "set", "x-plain", "1", "ok"),
    ],
)
def test_envoys_verdict(rules: MutationRules, op: str, name: str, value: str, verdict: str) -> None:
    assert check(rules, op, name, value) == verdict  # type: ignore[arg-type]


def test_no_rules_are_envoys_defaults() -> None:
    assert check(None, "set", ":authority", "a") == "ignore"
    assert check(None, "set", "x-a", "1") == "ok"
