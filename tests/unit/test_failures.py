"""Tests of failure masking, clustering and failure_cluster alerts. The quality bar on a simulated
fleet is in tests/evaluation/test_failures.py."""

from __future__ import annotations

import hashlib

import pytest
from sklearn.base import clone

from streams.detect.failures import FIRING, RESOLVED, FailureClusterer, mask, mode_key, signature

T0 = 1_793_491_200_000
MIN = 60_000


def run(run_id, ended_at=T0, agent="support-bot", error_type="not_found", message="order #48213 not found",
        tool_path=("lookup_order",), outcome="failure", version="v1", **extra):
    return {"run_id": run_id, "agent_id": agent, "agent_version": version, "ended_at": ended_at,
            "outcome": outcome, "error_type": error_type, "error_message": message,
            "tool_path": list(tool_path), "tool_errors": 1, **extra}


# --- mask ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("message, template", [
    ("order #48213 not found", "order #<id> not found"),
    ("booking ABC123 for user 3f2a9c1e-1b2c-4d5e-8f90-123456789abc failed", "booking <id> for user <id> failed"),
    ("commit deadbeef1234 at 0x7ffe12", "commit <hex> at <hex>"),
    ("mail to bob.smith@example.com bounced", "mail to <email> bounced"),
    ("HTTP 403 Forbidden fetching https://arxiv.org/abs/2401.01234?x=1", "HTTP <num> Forbidden fetching <url>"),
    ("No such file: 'src/a.py' or \"b c\"", "No such file: <str> or <str>"),
    ("refund of $12.50 exceeds limit, retry after 30s", "refund of $<num> exceeds limit, retry after <num>s"),
    ("12 tests failed in tests/test_auth.py::test_x_1", "<num> tests failed in <path>"),
    ("at 2026-11-01T00:00:00Z  request req_512", "at <ts> request <id>"),
    ("can't parse and/or decode", "can't parse and/or decode"),
    ("", ""),
])
def test_mask(message, template):
    assert mask(message) == template


def test_mask_is_idempotent_and_collapses_a_family():
    a = mask("SMTP relay mx12.mail.example.com timed out after 3000 ms (message 4821)")
    b = mask("SMTP relay mx7.mail.example.com timed out after 3000 ms (message 77)")
    assert a == b and mask(a) == a


def test_signature_is_the_mode_key_and_template_never_the_tool_or_agent():
    sig = signature(run("r1", tool_path=["get_customer", "lookup_order"]))
    assert sig == "failure|notfound | order #<id> not found"
    assert signature(run("r2", tool_path=["refund"], agent="other", version="v9")) == sig
    assert signature(run("r3", error_type="", message="", tool_path=[], outcome="aborted", loop_detected=True)) \
        == "loop | -"


@pytest.mark.parametrize("outcome, error_type, message, loop, key", [
    ("failure", "RateLimitError", "429", False, "failure|ratelimit"),
    ("failure", "rate_limit", "429", False, "failure|ratelimit"),
    ("failure", "", "openai.RateLimitError: Error code: 429", False, "failure|ratelimit"),
    ("failure", "ToolTimeout", "inventory-service did not answer", True, "failure|timeout"),  # a retried timeout
    ("aborted", "", "step budget exhausted", True, "loop"),
    ("aborted", "", "step budget exhausted", False, "loop"),  # a loop the detector missed
    ("failure", "max_steps", "stopped after 62 messages", False, "loop"),
    ("failure", "GraphRecursionError", "Recursion limit of 25 reached", False, "loop"),
    ("aborted", "", "", True, "loop"),
    ("failure", "RuntimeError", "Event loop is closed", False, "failure|runtime"),  # not an agent's loop
    ("failure", "loop_detected", "stopped after 4 identical fetch_url calls", False, "loop"),
    ("aborted", "", "", False, "aborted|"),
    ("timeout", "", "", False, "timeout"),
    ("timeout", "", "", True, "loop"),
    ("escalated", "policy_violation", "refund over limit", False, "escalated|policyviolation"),
])
def test_mode_key(outcome, error_type, message, loop, key):
    assert mode_key(outcome, error_type, message, loop) == key


@pytest.mark.parametrize("outcome, error_type, message, loop, key", [
    # a class that names a timeout is one class, however the framework spells it
    ("failure", "TimeoutError", "inventory-service did not answer", False, "failure|timeout"),
    ("failure", "ToolTimeout", "inventory-service did not answer", False, "failure|timeout"),
    ("failure", "tool_timeout", "inventory-service did not answer", False, "failure|timeout"),
    ("failure", "", "asyncio.TimeoutError: inventory-service did not answer", False, "failure|timeout"),
    ("failure", "httpx.ReadTimeout", "The read operation timed out", False, "failure|timeout"),
    ("failure", "Timeout", "", False, "failure|timeout"),
    ("escalated", "TimeoutError", "handed to a human after the tool timed out", False, "escalated|timeout"),
    # a run that never ended is not an error, even when its last tool call timed out
    ("timeout", "", "", False, "timeout"),
    # a timeout is never a loop for its message's words, nor for the loop detector's flag
    ("failure", "TimeoutError", "timed out waiting in the polling loop after 30 s", False, "failure|timeout"),
    ("failure", "", "TimeoutError: max iterations of the retry loop took longer than 30 s", True, "failure|timeout"),
    ("aborted", "", "step budget exhausted", True, "loop"),
    # a class that only contains the word is not a timeout
    ("failure", "TimeoutConfigError", "timeout must be positive", False, "failure|timeoutconfig"),
])
def test_timeouts_loops_escalations_and_errors_are_keyed_apart(outcome, error_type, message, loop, key):
    assert mode_key(outcome, error_type, message, loop) == key


def test_a_tool_s_timeout_status_is_evidence_and_timeout_errors_are_one_mode_per_service():
    """Runs that never ended (their last tool call timed out), a tool's timeout reported as ToolTimeout
    by one agent and as TimeoutError by another, another service's timeouts, a loop, and an
    escalation after a timeout: five modes, each only with its own."""
    inventory = "inventory-service did not answer within {n}000 ms (request req_{n}a1b)"
    runs = [
        run("never1", error_type="", message="", outcome="timeout", tool_path=["check_inventory"], tool_errors=1),
        run("never2", T0 + 1, error_type="", message="", outcome="timeout", tool_path=["search"], tool_errors=1),
        run("tool1", T0 + 2, agent="one", error_type="ToolTimeout", message=inventory.format(n=30)),
        run("tool2", T0 + 3, agent="two", error_type="TimeoutError", message=inventory.format(n=10)),
        run("tool3", T0 + 4, agent="three", error_type="", message="asyncio.TimeoutError: " + inventory.format(n=20),
            loop_detected=True),
        run("llm1", T0 + 5, error_type="openai.APITimeoutError", message="Request timed out."),
        run("llm2", T0 + 6, agent="two", error_type="APITimeoutError", message="Request timed out."),
        run("loop1", T0 + 7, error_type="", message="step budget exhausted", outcome="aborted", loop_detected=True),
        run("esc1", T0 + 8, error_type="TimeoutError", message=inventory.format(n=30), outcome="escalated"),
    ]
    _, _, assigned = FailureClusterer().update(runs)
    modes = [{run_id for run_id, cid in assigned.items() if cid == mode} for mode in dict.fromkeys(assigned.values())]
    assert sorted(map(sorted, modes)) == [["esc1"], ["llm1", "llm2"], ["loop1"], ["never1", "never2"],
                                          ["tool1", "tool2", "tool3"]]


# --- clustering -------------------------------------------------------------------------------------------


def test_estimator_conventions():
    model = FailureClusterer(threshold=0.8)
    assert vars(model) == model.get_params()  # __init__ stores parameters only
    assert clone(model).threshold == 0.8
    assert model.partial_fit([run("r1")]) is model
    assert model.clusters_ and model.predict([run("r9", outcome="success")]) == [""]


def test_same_template_joins_other_failure_modes_do_not():
    model = FailureClusterer()
    rows, _, assigned = model.update([
        run("a1", message="order #1 not found"), run("a2", message="order #99821 not found", ended_at=T0 + 1),
        run("b1", error_type="timeout", message="SMTP relay mx3.mail.example.com timed out after 3000 ms",
            tool_path=["send_email"], ended_at=T0 + 2),
        run("c1", error_type="", message="", tool_path=["refund"], outcome="aborted", ended_at=T0 + 3),
        run("s1", outcome="success", ended_at=T0 + 4),
    ])
    assert assigned["a1"] == assigned["a2"]
    assert len({assigned["a1"], assigned["b1"], assigned["c1"]}) == 3
    assert "s1" not in assigned
    row = next(r for r in rows if r["cluster_id"] == assigned["a1"])
    assert row["size"] == 2 and row["example_run_ids"] == ["a1", "a2"]
    assert row["label"] == "not_found: order #<id> not found (failure)"
    assert (row["first_seen"], row["last_seen"]) == (T0, T0 + 1)
    assert row["kind"] == "failure|notfound" and row["seed_signature"] == "order #<id> not found"
    assert model.predict([run("a3", message="order #5 not found")]) == [assigned["a1"]]


def test_one_error_type_with_other_messages_is_another_failure_mode():
    _, _, assigned = FailureClusterer().update([
        run("a", error_type="tool_error", message="payments-api refused the connection", tool_path=["refund"]),
        run("b", error_type="tool_error", message="card number 4242 is invalid", tool_path=["refund"]),
    ])
    assert assigned["a"] != assigned["b"]


def test_near_miss_validation_errors_are_two_modes_and_field_names_do_not_split_one():
    missing = "1 validation error for {model}\n{field}\n  Field required [type=missing, input_value={{'id': 7}}, input_type=dict]"
    ranged = ("1 validation error for {model}\n{field}\n  Input should be less than or equal to 10 "
              "[type=less_than_equal, input_value=512, input_type=int]")
    runs = [run(f"m{i}", T0 + i, error_type="ValidationError", message=missing.format(model=m, field=f))
            for i, (m, f) in enumerate([("CreateOrder", "customer_id"), ("UpdateBooking", "email"),
                                        ("CreateOrder", "shipping_address")])]
    runs += [run(f"r{i}", T0 + 10 + i, error_type="ValidationError", message=ranged.format(model=m, field=f))
             for i, (m, f) in enumerate([("CreateOrder", "quantity"), ("RefundRequest", "amount")])]
    _, _, assigned = FailureClusterer().update(runs)
    assert len({assigned["m0"], assigned["m1"], assigned["m2"]}) == 1
    assert assigned["r0"] == assigned["r1"] != assigned["m0"]


def test_one_cause_is_one_mode_across_agents_versions_and_last_tools():
    model = FailureClusterer()
    rows, _, assigned = model.update([
        run("a", agent="one", version="v1", tool_path=["lookup_order"]),
        run("b", agent="two", version="v7", tool_path=["send_email", "refund"], ended_at=T0 + 1),
        run("c", agent="two", version="v8", tool_path=[], ended_at=T0 + 2),
    ])
    assert len(set(assigned.values())) == 1
    (row,) = rows
    assert row["agents"] == ["one", "two"] and row["agent_id"] == "one" and row["size"] == 3
    cluster = model.clusters_[row["cluster_id"]]
    assert cluster.agents() == {"one": {"v1": 1}, "two": {"v7": 1, "v8": 1}}
    parts = {(r["agent_id"], r["agent_version"]): r for r in model.breakdown()}
    assert parts[("two", "v8")]["runs"] == 1 and parts[("two", "v8")]["first_seen"] == T0 + 2


def test_loops_do_not_share_a_mode_with_retried_timeouts():
    _, _, assigned = FailureClusterer().update([
        run("l1", error_type="", message="step budget exhausted", outcome="aborted", loop_detected=True),
        run("l2", error_type="", message="step budget exhausted after 31 steps", outcome="aborted", ended_at=T0 + 1),
        run("l3", error_type="", message="", outcome="aborted", loop_detected=True, ended_at=T0 + 2),
        run("t1", error_type="ToolTimeout", message="inventory-service did not answer within 30000 ms",
            loop_detected=True, ended_at=T0 + 3),
        run("t2", error_type="ToolTimeout", message="inventory-service did not answer within 20000 ms", ended_at=T0 + 4),
    ])
    assert assigned["l1"] == assigned["l2"] == assigned["l3"]
    assert assigned["t1"] == assigned["t2"] != assigned["l1"]


def test_ids_stable_as_modes_grow_and_deterministic():
    batches = [[run(f"r{b}{i}", ended_at=T0 + b * MIN + i, message=f"order #{b}{i} not found",
                    agent=("one", "two")[i % 2]) for i in range(4)] for b in range(3)]
    first, second = FailureClusterer(), FailureClusterer()
    ids = [set(first.update(batch)[2].values()) for batch in batches]
    assert ids[0] == ids[1] == ids[2] and len(ids[0]) == 1
    second.update([r for batch in batches for r in batch])
    assert set(second.clusters_) == ids[0]
    cid = next(iter(ids[0]))
    assert cid == "fc-" + hashlib.sha1("failure|notfound|order not found".encode()).hexdigest()[:12]


def test_a_mode_s_id_does_not_depend_on_which_of_its_runs_came_first():
    """One cause whose runs differ in ids, numbers, hosts, field and model names, the spelling of
    their class and text appended at the end: the same id whichever run arrives first, in one batch
    or one run at a time; its near miss (same class, another cause) another id; and the loop mode's
    id the same whichever loop message came first."""
    import random

    missing = ("1 validation error for {model}\n{field}\n  Field required [type=missing, "
               "input_value={{'id': {n}}}, input_type=dict]{noise}")
    family = [run(f"m{i}", T0 + i * 1000, agent=("one", "two", "three")[i % 3],
                  error_type=("ValidationError", "validation_error", "")[i % 3],
                  message=("" if i % 3 < 2 else "pydantic_core._pydantic_core.ValidationError: ") + missing.format(
                      model=("CreateOrder", "UpdateBooking", "RefundRequest")[i % 3],
                      field=("customer_id", "booking_ref", "payment_method", "shipping_address")[i % 4],
                      n=i * 7919, noise=" - the customer asked about their trip to denver" if i % 4 == 3 else ""))
              for i in range(12)]
    near_miss = [run(f"r{i}", T0 + 20_000 + i, error_type="ValidationError",
                     message="1 validation error for CreateOrder\nline_items\n  Input should be less than or equal to "
                             f"10 [type=less_than_equal, input_value={40 + i}, input_type=int]") for i in range(3)]
    loops = [run(f"l{i}", T0 + 30_000 + i, error_type="", outcome="aborted", loop_detected=i % 3 == 2 or i % 2 == 0,
                 message=("step budget exhausted", f"step budget exhausted after {20 + i} steps", "")[i % 3])
             for i in range(6)]
    ids = set()
    for seed in range(8):
        order = family + near_miss + loops
        random.Random(seed).shuffle(order)
        model = FailureClusterer()
        assigned = {}
        for r in order:  # one at a time: the arrival order, whatever event time says
            assigned.update(model.update([r])[2])
        assert len({assigned[r["run_id"]] for r in family}) == 1
        assert len({assigned[r["run_id"]] for r in loops}) == 1
        ids.add((assigned["m0"], assigned["r0"], assigned["l0"]))
    assert len(ids) == 1
    (modes,) = ids
    assert len(set(modes)) == 3


def test_restored_modes_keep_their_ids_and_counts():
    model = FailureClusterer()
    first = [run(f"a{i}", T0 + i, agent=("one", "two")[i % 2], message=f"order #{i} not found") for i in range(4)]
    rows, _, assigned = model.update(first)
    # the history a restart reads again: the same runs with their stored cluster, and one new run
    history = [{**r, "failure_cluster_id": assigned[r["run_id"]]} for r in first[2:]]
    history.append(run("b9", T0 + 9, agent="three", message="order #77 not found"))
    again = FailureClusterer().restore(rows, model.breakdown())
    out = again.update_modes(history, emit=False)
    (row,) = out.rows
    assert row["cluster_id"] == rows[0]["cluster_id"] and row["size"] == 5
    assert row["agents"] == ["one", "three", "two"] and row["first_seen"] == T0
    assert [(r["agent_id"], r["runs"]) for r in out.breakdown] == [("three", 1)]


def test_a_new_incident_lost_in_a_rebuild_goes_out_with_the_next_update():
    # the mode's row landed (size 3) but the partition was rebuilt before its incident went out
    model = FailureClusterer(min_size=3)
    rows, alerts, _ = model.update([run(f"a{i}", T0 + i) for i in range(3)])
    (incident,) = alerts
    lost = FailureClusterer(min_size=3).restore(rows, model.breakdown())
    assert lost.update_modes([], emit=False).alerts == []  # the history replayed: silent
    lost.restore_incidents([], sent=set())
    (again,) = lost.update_modes([run("b1", T0 + 10, agent="other", message="card declined")]).alerts
    assert (again["alert_id"], again["evidence"]["condition"]) == (incident["alert_id"], "new")
    # sent before the rebuild: not again
    kept = FailureClusterer(min_size=3).restore(rows, model.breakdown()).restore_incidents([], sent={incident["alert_id"]})
    assert kept.update_modes([run("b1", T0 + 10, agent="other", message="card declined")]).alerts == []


def test_a_mode_the_history_of_a_rebuild_makes_sends_its_new_incident_once():
    """The failed runs landed, but neither the mode's row nor its incident had when the partition
    was rebuilt (they were on their way to the mode's partition): the history replayed silently
    makes the mode at its size, and its "new" incident goes out with the next update, once; not
    when it was sent, nor when the mode is quiet already (the suite's flake: the incident of the
    outage never came)."""
    history = [run(f"a{i}", T0 + i * MIN) for i in range(3)]
    (incident,) = FailureClusterer(min_size=3).update(history)[1]  # what the partition would have sent

    def rebuilt(sent: set[str], later: list[dict] = ()) -> FailureClusterer:
        clusterer = FailureClusterer(min_size=3, new_quiet_ms=30 * MIN).restore([], [])
        clusterer.update_modes(history + list(later), emit=False)
        return clusterer.restore_incidents([], sent=sent)

    lost = rebuilt(set())
    (again,) = lost.update_modes([]).alerts
    assert (again["alert_id"], again["status"], again["evidence"]["condition"]) == (incident["alert_id"], FIRING, "new")
    assert again["evidence"]["agents"] == incident["evidence"]["agents"]
    assert lost.update_modes([run("a9", T0 + 4 * MIN)]).alerts == []  # once
    assert rebuilt({incident["alert_id"]}).update_modes([]).alerts == []
    quiet = rebuilt(set(), [run(f"ok{i}", T0 + (40 + i) * MIN, outcome="success") for i in range(2)])
    assert quiet.update_modes([]).alerts == []


def test_redelivered_run_is_counted_once():
    model = FailureClusterer()
    model.update([run("r1")])
    _, _, assigned = model.update([run("r1")])
    assert assigned == {"r1": next(iter(model.clusters_))}
    assert next(iter(model.clusters_.values())).size == 1


# --- alerts ------------------------------------------------------------------------------------------------


def test_new_cluster_alert_fires_once_at_min_size():
    model = FailureClusterer(min_size=3)
    alerts = []
    for i in range(6):
        alerts += model.update([run(f"r{i}", ended_at=T0 + i * 1000)])[1]
    assert len(alerts) == 1
    alert = alerts[0]
    cid = alert["evidence"]["cluster_id"]
    assert alert["kind"] == "failure_cluster" and alert["status"] == FIRING and alert["evidence"]["size"] == 3
    assert alert["evidence"]["condition"] == "new"
    assert alert["fingerprint"] == hashlib.sha1(f"failure_cluster|{cid}".encode()).hexdigest()[:24]
    assert alert["agent_id"] == "support-bot" and alert["agent_version"] == "v1" and alert["summary"]
    assert alert["evidence"]["agents"] == ["support-bot"] and alert["evidence"]["versions"] == {"support-bot": {"v1": 3}}


def test_a_new_mode_alerts_whichever_partition_s_batch_came_first():
    # the mode partition gets failed runs from every metrics partition: a later batch (another
    # agent, ten minutes on) may arrive before the batch that holds the new mode's first runs
    model = FailureClusterer(min_size=3)
    later = [run(f"late{i}", ended_at=T0 + 10 * MIN + i, agent="billing", message="card declined") for i in range(2)]
    early = [run(f"early{i}", ended_at=T0 + i * 1000) for i in range(3)]
    alerts = model.update(later)[1] + model.update(early)[1]
    assert [(a["evidence"]["condition"], a["evidence"]["size"], a["agent_id"]) for a in alerts] == [
        ("new", 3, "support-bot")]


def test_one_incident_as_a_mode_spreads_to_more_agents():
    """The incident fires once for the mode, is sent again (same fingerprint, new id) when a new
    agent fails in it, not for more runs of agents it lists, and resolves once, when it is quiet."""
    model = FailureClusterer(min_size=3, new_quiet_ms=30 * MIN)
    alerts = []
    agents = ["one"] * 4 + ["two", "two", "one", "three", "two"]
    for i, agent in enumerate(agents):
        alerts += model.update([run(f"r{i}", ended_at=T0 + i * MIN, agent=agent, version=f"v{i % 2}")])[1]
    assert [(a["status"], a["evidence"]["agents"]) for a in alerts] == [
        (FIRING, ["one"]), (FIRING, ["one", "two"]), (FIRING, ["one", "three", "two"])]
    assert len({a["fingerprint"] for a in alerts}) == 1 and len({a["alert_id"] for a in alerts}) == 3
    assert {a["agent_id"] for a in alerts} == {"one"}  # the alert's name stays; the evidence grows
    assert alerts[1]["evidence"]["spread_to"] == "two" and alerts[2]["evidence"]["versions"]["three"] == {"v1": 1}
    later = []
    for i in range(40):
        later += model.update([run(f"ok{i}", ended_at=T0 + (20 + i) * MIN, outcome="success")])[1]
    assert [(a["status"], a["fingerprint"]) for a in later] == [(RESOLVED, alerts[0]["fingerprint"])]
    assert later[0]["evidence"]["agents"] == ["one", "three", "two"]


def test_partial_fit_warms_up_silently():
    model = FailureClusterer().partial_fit([run(f"r{i}", ended_at=T0 + i) for i in range(5)])
    assert model.update([run("r9", ended_at=T0 + 10)])[1] == []


def _steady(model, windows, per_window, start=0, prefix="s"):
    """Each window: `per_window` failures among 20 runs of the agent."""
    alerts = []
    for w in range(start, start + windows):
        at = T0 + w * 5 * MIN
        batch = [run(f"{prefix}{w}-{i}", ended_at=at + i * 1000) for i in range(per_window)]
        batch += [run(f"{prefix}{w}-ok{i}", ended_at=at + i * 1000, outcome="success") for i in range(20 - per_window)]
        alerts += model.update(batch)[1]
    return alerts


def test_spike_fires_once_and_resolves_once():
    model = FailureClusterer(min_size=100)  # no "new" alert in the way
    assert _steady(model, 8, 1) == []
    alerts = _steady(model, 2, 12, start=8, prefix="b")  # two windows of 12 in 20 against 1 in 20
    assert [a["status"] for a in alerts] == [FIRING]
    spike = alerts[0]
    cid = spike["evidence"]["cluster_id"]
    assert spike["fingerprint"] == hashlib.sha1(f"failure_cluster|{cid}".encode()).hexdigest()[:24]
    assert spike["evidence"]["condition"] == "spike"
    assert spike["evidence"]["count"] >= 5 and spike["evidence"]["p_value"] <= 1e-3
    alerts = _steady(model, 4, 1, start=10, prefix="c")
    assert [a["status"] for a in alerts] == [RESOLVED]
    assert alerts[0]["fingerprint"] == spike["fingerprint"]


def test_a_burst_of_traffic_is_not_a_spike():
    model = FailureClusterer(min_size=100)
    _steady(model, 8, 1)
    at = T0 + 8 * 5 * MIN
    burst = [run(f"x{i}", ended_at=at + i, outcome="failure" if i % 20 == 0 else "success") for i in range(400)]
    assert model.update(burst)[1] == []  # 20 failures, but still 1 in 20 runs


def test_alerts_match_streams_alerts():
    alerts = pytest.importorskip("streams.contracts.alerts")
    model = FailureClusterer()
    alert = model.update([run(f"r{i}", ended_at=T0 + i) for i in range(3)])[1][0]
    fields = {k: v for k, v in alert.items() if k not in ("alert_id", "kind")}
    assert alerts.make_alert(kind="failure_cluster", **fields, episode=alert["evidence"]["cluster_id"]) == alert


def test_a_new_cluster_alert_resolves_once_the_cluster_goes_quiet():
    from streams.detect.failures import FailureClusterer

    def failed(i: int, ended: int) -> dict:
        return {"run_id": f"q{i}", "agent_id": "quiet-bot", "agent_version": "v1", "outcome": "failure",
                "ended_at": ended, "error_type": "timeout", "error_message": f"upstream took {i} s",
                "tool_path": ["fetch"], "loop_detected": False}

    def ok(i: int, ended: int) -> dict:
        return {**failed(i, ended), "run_id": f"ok{i}", "outcome": "success", "error_type": "", "error_message": ""}

    model = FailureClusterer(new_quiet_ms=3_600_000)
    t0 = 1_793_491_200_000
    _, alerts, _ = model.update([failed(i, t0 + i * 60_000) for i in range(4)])
    assert [(a["evidence"]["condition"], a["status"]) for a in alerts] == [("new", "firing")]
    # successes only for the next two hours: quiet for an hour, the alert resolves, once
    later = []
    for i in range(120):
        later += model.update([ok(i, t0 + 10 * 60_000 + i * 60_000)])[1]
    assert [(a["evidence"]["condition"], a["status"]) for a in later] == [("new", "resolved")]
    assert later[0]["fingerprint"] == alerts[0]["fingerprint"] and later[0]["alert_id"] != alerts[0]["alert_id"]


def test_a_signature_seen_before_keeps_the_vector_it_would_get_now(monkeypatch):
    """_learn reuses each template's vector: it is the row _vectorise gives it, however the
    batches were cut and whichever templates shared them, and the kept ones stay bounded."""
    import numpy as np

    from streams.detect import failures
    from streams.detect.failures import _fields, _row

    monkeypatch.setattr(failures, "_REMEMBERED_VECTORS", 8)
    messages = ["order #1 not found", "timeout after 30s calling https://x.io/a", "quota exceeded",
                "No such file: 'a.py'", "", "refund of $3 exceeds limit", "step budget exhausted"]
    runs = [run(f"r{i}", message=messages[i % 7], tool_path=("a", "b")[: i % 3], loop_detected=i % 5 == 0,
                error_type=("not_found", "timeout", "")[i % 3], outcome=("failure", "timeout")[i % 2])
            for i in range(60)]
    texts = [FailureClusterer._text(*_fields(r)[:2]) for r in runs]
    whole = FailureClusterer()._vectorise(texts)
    clusterer = FailureClusterer()
    clusterer._ensure_state()
    got = []
    for cut in (0, 1, 9, 10, 33, 60):
        got += clusterer._vectors(texts[len(got):cut])
        assert len(clusterer.vectors_) <= 8
    assert len(got) == len(runs)
    for i, (features, values) in enumerate(got):
        want_features, want_values = _row(whole, i)
        assert np.array_equal(features, want_features) and np.array_equal(values, want_values)


def test_a_signature_placed_before_finds_the_same_centroids(monkeypatch):
    """A mode key's centroids look a template's feature columns up once; clusters, assignments
    and centroid sums are those of looking them up for every run."""
    import numpy as np

    from streams.detect import failures

    messages = ["order #1 not found", "timeout after 30s calling https://x.io/a", "quota exceeded for key k1",
                "No such file: 'a.py'", "", "refund of $3 exceeds limit", "upstream 503 from payments"]
    runs = [run(f"r{i}", T0 + i * 7_000, agent=("a", "b")[i % 2], message=messages[(i * i) % 7],
                tool_path=("lookup", "refund", "search")[: 1 + i % 3], error_type=("not_found", "timeout", "")[i % 3],
                outcome=("failure", "timeout", "success")[i % 3 if i % 5 else 0]) for i in range(400)]

    def learn(clusterer):
        out = [clusterer.update(runs[i:i + 37]) for i in range(0, len(runs), 37)]
        return out, {key: space.sums[: space.k].copy() for key, space in clusterer.centroids_.items()}

    placed = learn(FailureClusterer())
    with monkeypatch.context() as m:
        for name in ("similarities", "add"):
            plain = getattr(failures._Centroids, name)
            m.setattr(failures._Centroids, name, lambda self, *args, _plain=plain: _plain(self, *args[:-1]))
        looked_up = learn(FailureClusterer())
    assert placed[0] == looked_up[0]
    assert placed[1].keys() == looked_up[1].keys()
    assert all(np.array_equal(placed[1][a], looked_up[1][a]) for a in placed[1])


# --- incidents across a restart -------------------------------------------------------------------------


def _restarted(model, sent_alerts, history, **params):
    """A clusterer rebuilt as a metrics partition rebuilds it: the stored modes and breakdown, the
    history replayed silently (with each run's stored mode), then the open incidents from the alerts."""
    rebuilt = FailureClusterer(**params).restore(model.cluster_rows(), model.breakdown())
    rebuilt.update_modes([{**r, "failure_cluster_id": model.seen_runs_.get(r["run_id"]) or ""} for r in history],
                         emit=False)
    return rebuilt.restore_incidents(sent_alerts, sent={a["alert_id"] for a in sent_alerts})


def test_an_open_incident_is_updated_after_a_restart_not_sent_again_as_new():
    """A mode fails agent one, its incident fires; after a restart it spreads to agent two: the same
    incident is updated (same fingerprint, both agents), no second "new" incident; then it resolves
    once quiet, however long no failed run comes, since closed runs move event time on."""
    model = FailureClusterer(min_size=3, new_quiet_ms=30 * MIN)
    history = [run(f"a{i}", T0 + i * MIN, agent="one", message=f"order #{i} not found") for i in range(4)]
    sent = model.update(history)[1]
    (incident,) = sent
    rebuilt = _restarted(model, sent, history, min_size=3, new_quiet_ms=30 * MIN)
    assert rebuilt.update_modes([run("a9", T0 + 5 * MIN, agent="one", message="order #9 not found")]).alerts == []
    (update,) = rebuilt.update_modes([run("b1", T0 + 6 * MIN, agent="two", message="order #31 not found")]).alerts
    assert (update["status"], update["fingerprint"], update["evidence"]["agents"]) == (
        FIRING, incident["fingerprint"], ["one", "two"])
    assert update["alert_id"] != incident["alert_id"] and update["evidence"]["episode"] == incident["evidence"]["episode"]
    assert update["evidence"]["spread_to"] == "two" and update["agent_id"] == "one"
    # only closed runs from now on, counted per agent and window where they closed (no failed run here)
    later = []
    for w in range(1, 10):
        later += rebuilt.update_modes([], traffic={"one": {str(T0 + w * 5 * MIN): 20}}).alerts
    assert [(a["status"], a["fingerprint"], a["evidence"]["agents"]) for a in later] == [
        (RESOLVED, incident["fingerprint"], ["one", "two"])]
    assert later[0]["alert_id"] == model._resolved(model.clusters_[incident["evidence"]["cluster_id"]], incident, {}, "")[
        "alert_id"]  # the resolve of the episode that fired before the restart


def test_an_incident_resolves_when_one_message_moves_the_clock_past_its_quiet_time():
    """Closed runs of an hour counted in one message (a backlog handled at once, as a loaded
    worker batches it): the mode is quiet as of the window they open, and its incident resolves
    then, not only when a later message comes (found by the restart test in the full suite)."""
    model = FailureClusterer(min_size=3, new_quiet_ms=30 * MIN)
    (incident,) = model.update([run(f"a{i}", T0 + i * MIN, message=f"order #{i} not found") for i in range(4)])[1]
    later = model.update_modes([], traffic={"one": {str(T0 + w * 5 * MIN): 20 for w in range(1, 10)}}).alerts
    assert [(a["status"], a["fingerprint"]) for a in later] == [(RESOLVED, incident["fingerprint"])]


def test_the_last_update_sent_is_the_incident_restored():
    model = FailureClusterer(min_size=3)
    history = [run(f"a{i}", T0 + i * MIN, agent=("one", "one", "one", "two")[i]) for i in range(4)]
    sent = model.update(history)[1]
    assert [a["evidence"]["agents"] for a in sent] == [["one"], ["one", "two"]]
    rebuilt = _restarted(model, list(reversed(sent)), history, min_size=3)
    assert rebuilt.update_modes([run("b2", T0 + 5 * MIN, agent="two")]).alerts == []  # two is listed already
    (update,) = rebuilt.update_modes([run("c1", T0 + 6 * MIN, agent="three")]).alerts
    assert update["evidence"]["agents"] == ["one", "three", "two"] and update["fingerprint"] == sent[0]["fingerprint"]


def test_a_resolved_incident_is_not_restored_and_not_sent_again():
    model = FailureClusterer(min_size=3, new_quiet_ms=30 * MIN)
    history = [run(f"a{i}", T0 + i * MIN, agent="one") for i in range(3)]
    sent = model.update(history)[1]
    sent += model.update([run(f"ok{i}", T0 + (50 + 5 * i) * MIN, outcome="success") for i in range(2)])[1]
    assert [a["status"] for a in sent] == [FIRING, RESOLVED]
    rebuilt = _restarted(model, sent, history, min_size=3, new_quiet_ms=30 * MIN)
    assert all(c.incident is None for c in rebuilt.clusters_.values())
    assert rebuilt.update_modes([run("b1", T0 + 51 * MIN, agent="two")]).alerts == []


def test_a_restored_spike_resolves_when_its_window_is_over():
    model = FailureClusterer(min_size=100)
    _steady(model, 8, 1)
    (spike,) = _steady(model, 1, 12, start=8, prefix="b")
    assert spike["evidence"]["condition"] == "spike"
    # restored with no history replayed: the spike is tested with the next update, and is over
    rebuilt = FailureClusterer(min_size=100).restore(model.cluster_rows(), model.breakdown())
    rebuilt.restore_incidents([spike], sent={spike["alert_id"]})
    alerts = _steady(rebuilt, 2, 1, start=10, prefix="c")
    assert [(a["status"], a["fingerprint"]) for a in alerts] == [(RESOLVED, spike["fingerprint"])]
    assert alerts[0]["evidence"]["episode"] == spike["evidence"]["episode"]


def test_agents_that_joined_in_the_history_a_restart_read_back_update_the_incident_once():
    # the second agent's runs landed, but the incident's update had not gone out before the restart
    # (or they were read back while the partition was rebuilt): the update goes out with the next update
    model = FailureClusterer(min_size=3)
    history = [run(f"a{i}", T0 + i * MIN, agent="one") for i in range(3)]
    (incident,) = model.update(history)[1]
    history += [run("b1", T0 + 4 * MIN, agent="two"), run("b2", T0 + 5 * MIN, agent="two")]
    rebuilt = _restarted(model, [incident], history, min_size=3)
    (update,) = rebuilt.update_modes([]).alerts
    assert (update["fingerprint"], update["evidence"]["agents"], update["evidence"]["spread_to"]) == (
        incident["fingerprint"], ["one", "two"], "two")
    assert update["evidence"]["spread_at"] == T0 + 4 * MIN and update["evidence"]["size"] == 5
    # the same update as the live stream would have sent
    assert update["alert_id"] == model.update(history[3:])[1][0]["alert_id"]
    assert rebuilt.update_modes([run("b3", T0 + 6 * MIN, agent="two")]).alerts == []
