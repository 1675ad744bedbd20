"""Envoy's header mutation rules (``HeaderMutationRules``): the route setting, and Envoy's check.

Envoy applies the header changes an ext_proc server sends only where the filter's
``mutation_rules`` allow them; a change they do not allow is dropped (counted in
``rejected_header_mutations``), or fails the exchange with a 500 when ``disallow_is_error``
is set. With no rules, every header may change except the routing headers (``host``,
``:authority``, ``:method``, ``:scheme``) and ``x-envoy-*``. Whatever the rules, a ``:``
header or ``host`` is never removed and a ``:`` header never gets a second value.

:class:`MutationRules` is the route key ``mutation_rules`` (Envoy's field names), which
``envoy-config`` writes into the route's filter as it is; :func:`check` is Envoy's verdict on
one change (``source/extensions/filters/common/mutation_rules/mutation_rules.cc``), so the
test kit applies exactly what Envoy applies.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, field_validator

#: Headers that pick the route or the upstream: changed only with ``allow_all_routing``.
ROUTING_HEADERS = frozenset({"host", ":authority", ":method", ":scheme"})
#: The prefix of Envoy's own headers (the bootstrap's ``header_prefix``): ``allow_envoy``.
ENVOY_PREFIX = "x-envoy"

#: What a change does: set (replace) a header, append a value to one, remove one.
Operation = Literal["set", "append", "remove"]
#: Envoy's verdict on a change: apply it, drop it, or fail the exchange (``disallow_is_error``).
Verdict = Literal["ok", "ignore", "fail"]


class MutationRules(BaseModel):
    """``mutation_rules = { allow_all_routing = true }``: which header changes Envoy accepts
    from the host on this route (Envoy's ``HeaderMutationRules``; regular expressions are
    RE2, matched against the whole lower-case name)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    allow_all_routing: bool = False
    allow_envoy: bool = False
    disallow_system: bool = False
    disallow_all: bool = False
    allow_expression: str | None = None
    disallow_expression: str | None = None
    disallow_is_error: bool = False

    @field_validator("allow_expression", "disallow_expression")
    @classmethod
    def _check_regex(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a regular expression: {exc}") from None
        return value


def _allowed(rules: MutationRules, op: Operation, name: str) -> bool:
    if op == "remove" and (name.startswith(":") or name == "host"):
        return False  # whatever the rules say
    if rules.disallow_expression is not None and re.fullmatch(rules.disallow_expression, name):
        return False
    if rules.allow_expression is not None and re.fullmatch(rules.allow_expression, name):
        return True
    if rules.disallow_all:
        return False
    if not rules.allow_all_routing and name in ROUTING_HEADERS:
        return False
    if name.startswith(":") and (op == "append" or rules.disallow_system):
        return False  # a ':' header has one value
    return rules.allow_envoy or not name.startswith(ENVOY_PREFIX)


def _valid_value(name: str, value: str) -> bool:
    if name in ("host", ":authority"):
        return bool(value) and not any(c in value for c in " \t/\\?#@")
    if name == ":scheme":
        return value.lower() in ("http", "https")
    if name == ":status":
        return value.isdigit() and int(value) >= 200
    return not any(c in value for c in "\r\n\0")


def check(rules: MutationRules | None, op: Operation, name: str, value: str = "") -> Verdict:
    """Envoy's verdict on changing header ``name`` (lower case) to ``value``."""
    rules = rules or MutationRules()
    if _allowed(rules, op, name) and (op == "remove" or _valid_value(name, value)):
        return "ok"
    return "fail" if rules.disallow_is_error else "ignore"
