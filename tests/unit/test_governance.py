"""Tests of governance.py: a run row's guardrail and approval signals, rows without them included."""

from __future__ import annotations

import pytest

from streams.detect.governance import DECISIONS, approval_denied, guardrail, guardrail_acted


@pytest.mark.parametrize("hits, worst", [
    (None, "none"),
    ({}, "none"),
    ({"pii:allowed": 2}, "allowed"),
    ({"pii:allowed": 1, "tone:warned": 1}, "warned"),
    ({"tone:warned": 3, "pii:redacted": 1}, "redacted"),
    ({"pii:redacted": 1, "refund:blocked": 1, "tone:warned": 1}, "blocked"),
    ({"tool:refund:blocked": 1}, "blocked"),  # the key splits at its last ':'
    ({"refund:blocked": 0, "pii:allowed": 1}, "allowed"),  # a count of 0 is no hit
    ({"refund:": 1}, "unknown"),  # a hit without a decision: evaluated, effect unknown
    ({"refund:": 1, "pii:allowed": 1}, "allowed"),
    ([("pii:warned", 1), ("tool:x:allowed", 1)], "warned"),  # (key, count) pairs read alike
])
def test_guardrail_is_the_most_severe_decision(hits, worst):
    row = {} if hits is None else {"policy_hits": hits}
    assert guardrail(row) == worst
    assert guardrail_acted(row) == (worst in ("warned", "redacted", "blocked"))


def test_guardrail_names_are_the_modules_own_strings():
    built = "".join(["bl", "ocked"])  # equal to "blocked", another object
    assert guardrail({"policy_hits": {"pii:" + built: 1}}) is DECISIONS[-1]


def test_approval_denied_reads_absent_and_null_as_no():
    assert not approval_denied({}) and not approval_denied({"approvals_denied": None})
    assert not approval_denied({"approvals_denied": 0, "approvals_requested": 3})
    assert approval_denied({"approvals_denied": 2})
