"""Unit tests of the simulated agent fleet and of its ground truth."""

import itertools
import json
from collections import Counter
from dataclasses import replace
from datetime import datetime, timezone
from statistics import mean

import pytest

import jobs.simulate as sim
from jobs.simulate import (CanarySpec, FleetConfig, GuardrailPolicy, VersionSpec, run_labels, simulate, truth,
                           write_jsonl)

COMMON = {"event_id", "ts", "type", "run_id", "agent_id", "agent_version"}
BY_TYPE = {
    "run_start": set(),
    "llm_call": {"model", "provider", "input_tokens", "output_tokens", "cache_read_input_tokens",
                 "latency_ms", "status"},
    "tool_call": {"tool", "args", "status", "latency_ms"},
    "run_end": {"outcome"},
    "policy_hit": {"policy", "decision"},
    "approval": {"status", "action"},
    "feedback": {"score", "source"},
}
OPTIONAL = {"task_id", "session_id", "tenant", "environment", "attributes", "cost_usd", "error_type",
            "error_message", "score"}
OPTIONAL_BY_TYPE = {"policy_hit": {"tool"}, "approval": {"approver", "wait_ms"}, "feedback": {"label"}}
CORE = ("run_start", "llm_call", "tool_call", "run_end")
GOVERNANCE = ("policy_hit", "approval", "feedback")


def linear_price(model, provider, input_tokens, output_tokens, cache_read_input_tokens):
    # a stand-in price table: deterministic, cheap, and sensitive to every argument
    rate = {"gpt-4o": 1.0, "gpt-4o-mini": 0.1, "claude-sonnet-4-5": 1.2, "claude-haiku-4-5": 0.4}[model]
    return rate * (2.5e-6 * (input_tokens - cache_read_input_tokens) + 1e-6 * cache_read_input_tokens
                   + 1e-5 * output_tokens)


@pytest.fixture(scope="module")
def fleet():
    cfg = FleetConfig(runs=3000, seed=11, loop_fraction=0.05, timeout_fraction=0.04)
    return cfg, list(simulate(cfg)), run_labels(cfg)


def by_run(events):
    runs = {}
    for ev in events:
        runs.setdefault(ev["run_id"], []).append(ev)
    return runs


def test_default_start_is_2026_11_01_utc():
    assert sim.DEFAULT_START_MS == int(datetime(2026, 11, 1, tzinfo=timezone.utc).timestamp() * 1000)


def test_same_config_gives_byte_identical_output(tmp_path):
    cfg = FleetConfig(runs=300, seed=5, price_fn=linear_price, canary=sim.DEFAULT_CANARY)
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    write_jsonl(simulate(cfg), str(a))
    write_jsonl(simulate(FleetConfig(runs=300, seed=5, price_fn=linear_price, canary=sim.DEFAULT_CANARY)), str(b))
    assert a.read_bytes() == b.read_bytes()
    assert all(b'"type":"%s"' % t.encode() in a.read_bytes() for t in GOVERNANCE)
    other = list(simulate(FleetConfig(runs=300, seed=6)))
    assert [e["event_id"] for e in other] != [json.loads(line)["event_id"] for line in a.read_text().splitlines()]


def test_prices_only_add_cost_fields():
    plain = list(simulate(FleetConfig(runs=200, seed=2)))
    priced = list(simulate(FleetConfig(runs=200, seed=2, price_fn=linear_price)))
    assert [{k: v for k, v in e.items() if k != "cost_usd"} for e in priced] == plain
    assert not any("cost_usd" in e for e in plain)


def test_reported_cost_is_true_price_on_configured_fraction():
    events = list(simulate(FleetConfig(runs=1000, seed=4, price_fn=linear_price, cost_fraction=0.3)))
    llm = [e for e in events if e["type"] == "llm_call"]
    with_cost = [e for e in llm if "cost_usd" in e]
    assert 0.27 < len(with_cost) / len(llm) < 0.33
    for e in with_cost:
        assert e["cost_usd"] == linear_price(e["model"], e["provider"], e["input_tokens"], e["output_tokens"],
                                             e["cache_read_input_tokens"])


def test_every_event_has_the_fields_of_its_type(fleet):
    _, events, _ = fleet
    ids = set()
    for e in events:
        assert COMMON <= e.keys(), e
        assert e.keys() <= COMMON | BY_TYPE[e["type"]] | OPTIONAL | OPTIONAL_BY_TYPE.get(e["type"], set()), e
        assert BY_TYPE[e["type"]] <= e.keys(), e
        assert isinstance(e["ts"], int) and all(isinstance(e[k], str) for k in COMMON - {"ts"})
        ids.add(e["event_id"])
        if e["type"] == "llm_call":
            assert sim.MODELS[e["model"]][0] == e["provider"]
            assert e["status"] in ("ok", "error")
            assert 300 <= e["latency_ms"] <= 8000
            if e["status"] == "ok":
                assert 500 <= e["input_tokens"] <= 20000 and 20 <= e["output_tokens"] <= 1500
                assert 0 <= e["cache_read_input_tokens"] <= e["input_tokens"]
                assert "error_type" not in e
            else:
                assert e["error_type"] in ("rate_limit", "context_length_exceeded")
        elif e["type"] == "tool_call":
            assert e["status"] in ("ok", "error", "timeout")
            assert 20 <= e["latency_ms"] <= 3000
            json.dumps(e["args"])
            assert ("error_type" in e) == ("error_message" in e) == (e["status"] != "ok")
        elif e["type"] == "run_end":
            assert e["outcome"] in ("success", "failure", "escalated", "aborted")
            assert 0 <= e.get("score", 0) <= 1
            assert ("error_type" in e) == ("error_message" in e) == (e["outcome"] == "failure")
        elif e["type"] == "policy_hit":
            assert e["decision"] in sim.POLICY_DECISIONS and e["policy"]
            assert e.get("tool") is None or e["tool"] in sim.TOOLS  # absent: it checked the model's output
        elif e["type"] == "approval":
            assert e["status"] in sim.APPROVAL_STATUSES and e["action"]
            assert ("wait_ms" in e) == (e["status"] != "requested")
            assert ("approver" in e) == (e["status"] in ("granted", "denied"))
        elif e["type"] == "feedback":
            assert 0 <= e["score"] <= 1 and e["source"] in ("user", "eval") and e["label"]
    assert len(ids) == len(events)
    assert {e["type"] for e in events} == set(BY_TYPE)


def test_global_order_and_order_within_runs(fleet):
    cfg, events, labels = fleet
    assert all(a["ts"] <= b["ts"] for a, b in itertools.pairwise(events))
    for run_id, evs in by_run(events).items():
        assert evs[0]["type"] == "run_start"
        assert all(e["type"] != "run_start" for e in evs[1:])
        ended = [i for i, e in enumerate(evs) if e["type"] == "run_end"]
        assert len(ended) <= 1
        if ended:  # only feedback after run_end
            assert all(e["type"] == "feedback" for e in evs[ended[0] + 1:])
        assert all(a["ts"] <= b["ts"] for a, b in itertools.pairwise(evs))
        core = [e for e in evs if e["type"] in CORE]
        # governance events lie within the run's span (feedback: at run_end, with no delay configured)
        assert all(core[0]["ts"] < e["ts"] <= core[-1]["ts"] for e in evs if e["type"] in GOVERNANCE)
        for prev, cur in itertools.pairwise(core):
            assert cur["ts"] > prev["ts"]
            if cur["type"] in ("llm_call", "tool_call"):
                assert cur["ts"] - prev["ts"] == cur["latency_ms"]  # ts marks when the call finished
        steps = sum(e["type"] in ("llm_call", "tool_call") for e in core)
        if not labels[run_id]["timeout"]:
            assert 3 <= steps <= 30


def test_runs_overlap(fleet):
    _, events, _ = fleet
    spans = [(evs[0]["ts"], evs[-1]["ts"]) for evs in by_run(events).values()]
    edges = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans])
    assert max(itertools.accumulate(d for _, d in edges)) >= 10


def test_loops_injected_at_rate_and_detectable(fleet):
    cfg, events, labels = fleet
    loops = sum(label["loop"] for label in labels.values())
    assert abs(loops / cfg.runs - cfg.loop_fraction) < 0.015
    detected = truth(events)["runs"]  # loop flag from the events, by definition
    assert {r: v["loop"] for r, v in detected.items()} == {r: v["loop"] for r, v in labels.items()}
    for run_id, label in labels.items():
        if label["loop"]:
            assert label["outcome"] in ("aborted", "failure") and label["failure_family"] == "tool_loop"


def test_pagination_is_not_a_loop(fleet):
    _, events, labels = fleet
    detected = truth(events)["runs"]
    paged = 0
    for run_id, evs in by_run(events).items():
        pages = [e["args"]["page"] for e in evs if e["type"] == "tool_call" and e["tool"] == "web_search"]
        if len(set(pages)) >= 3 and not labels[run_id]["loop"]:
            paged += 1
            assert not detected[run_id]["loop"]
    assert paged > 10


def test_timeouts_have_no_run_end_and_sit_in_first_half(fleet):
    cfg, events, labels = fleet
    runs = by_run(events)
    mid = cfg.start_ms + cfg.duration_ms // 2
    timeouts = [r for r, label in labels.items() if label["timeout"]]
    assert abs(len(timeouts) / cfg.runs - cfg.timeout_fraction) < 0.015
    for run_id in timeouts:
        assert all(e["type"] != "run_end" and e["ts"] < mid for e in runs[run_id])
    for run_id, label in labels.items():
        if not label["timeout"]:
            end = [e for e in runs[run_id] if e["type"] != "feedback"][-1]
            assert end["type"] == "run_end" and end["outcome"] == label["outcome"]
    outcomes = truth(events, labels=labels)["runs"]
    assert all(outcomes[r]["outcome"] == "timeout" for r in timeouts)


def test_canary_degrades_success_and_raises_cost():
    canary = CanarySpec("coder", "0.11.0-rc1", share=0.5, success_rate=0.35, cost_multiplier=1.6)
    cfg = FleetConfig(runs=3000, seed=9, canary=canary, price_fn=linear_price)
    events = list(simulate(cfg))
    labels = run_labels(cfg)
    canary_start = cfg.start_ms + cfg.duration_ms // 2
    assert all(label["start_ms"] >= canary_start for label in labels.values() if label["canary"])
    groups = truth(events, price_fn=linear_price)["groups"]
    bad, good = groups[("coder", "0.11.0-rc1")], groups[("coder", "0.9.3")]
    assert bad["runs"] > 100
    assert bad["success_rate"] < good["success_rate"] - 0.2
    assert bad["cost_usd"] / bad["runs"] > 1.2 * good["cost_usd"] / good["runs"]
    # the other agents' runs are untouched by the canary
    plain = run_labels(FleetConfig(runs=3000, seed=9))
    assert all(plain[r] == label for r, label in labels.items() if label["agent_id"] != "coder")


def test_truth_on_hand_made_events():
    base = {"agent_id": "a", "agent_version": "1"}

    def ev(i, run, type_, **kw):
        return {"event_id": f"e{i}", "ts": i, "type": type_, "run_id": run, **base, **kw}

    def llm(i, run, cost=None, tokens=(1000, 100, 0)):
        e = ev(i, run, "llm_call", model="gpt-4o", provider="openai", input_tokens=tokens[0],
               output_tokens=tokens[1], cache_read_input_tokens=tokens[2], latency_ms=1, status="ok")
        if cost is not None:
            e["cost_usd"] = cost
        return e

    def tool(i, run, args):
        return ev(i, run, "tool_call", tool="lookup_order", args=args, status="ok", latency_ms=1)

    events = [
        ev(1, "r1", "run_start"), llm(2, "r1", cost=0.5), tool(3, "r1", {"id": 1}), llm(4, "r1"),
        ev(5, "r1", "run_end", outcome="success"),
        ev(6, "r2", "run_start"), llm(7, "r2", cost=0.25), tool(8, "r2", {"id": 2}), llm(9, "r2", cost=0.25),
        tool(10, "r2", {"id": 2}), llm(11, "r2", cost=0.0), tool(12, "r2", {"id": 2}),
        ev(13, "r2", "run_end", outcome="aborted"),
        ev(14, "r3", "run_start"), llm(15, "r3"), tool(16, "r3", {"id": 3}),  # never ends
        # governance: neither steps nor cost, but events, hits, approvals and feedback of their run
        ev(20, "r1", "policy_hit", policy="pii_output", decision="redacted"),
        ev(21, "r1", "policy_hit", policy="pii_output", decision="redacted"),
        ev(22, "r1", "approval", status="requested", action="refund over $200"),
        ev(23, "r1", "approval", status="granted", action="refund over $200", approver="sam", wait_ms=1500),
        ev(24, "r1", "feedback", score=1.0, label="thumbs_up", source="user"),
        ev(25, "r1", "feedback", score=0.5, source="eval"),
        ev(26, "r2", "approval", status="requested", action="refund over $200"),
        ev(27, "r2", "approval", status="denied", action="refund over $200", wait_ms=300),
        ev(28, "r2", "policy_hit", policy="refund_limit", decision="blocked", tool="refund"),
    ]
    redelivered = [dict(events[-5])]  # the same feedback event again: counted once
    # events arrive out of order in a pipeline; truth must not care
    got = truth(list(reversed(events + redelivered)), price_fn=lambda m, p, i, o, c: 0.125)
    assert got["runs"]["r1"] == {"agent_id": "a", "agent_version": "1", "outcome": "success", "steps": 3,
                                 "loop": False, "cost_usd": 0.625, "unpriced_llm_calls": 0, "events": 11,
                                 "policy_hits": {"pii_output:redacted": 2},
                                 "approvals": {"requested": 1, "granted": 1, "denied": 0, "expired": 0},
                                 "approval_waits_ms": [1500], "feedback": 2, "feedback_score": 0.75}
    assert got["runs"]["r2"]["loop"] and got["runs"]["r2"]["steps"] == 6 and got["runs"]["r2"]["cost_usd"] == 0.5
    assert got["runs"]["r2"]["approvals"]["denied"] == 1 and got["runs"]["r2"]["feedback_score"] is None
    assert got["runs"]["r3"]["outcome"] == "timeout" and got["runs"]["r3"]["cost_usd"] == 0.125
    assert got["runs"]["r3"]["events"] == 3 and got["runs"]["r3"]["policy_hits"] == {}
    g = got["groups"][("a", "1")]
    assert (g["runs"], g["successes"], g["loops"]) == (3, 1, 1)
    assert (g["events"], g["runs_with_policy_hit"], g["feedback"], g["feedback_score"]) == (25, 2, 2, 0.75)
    assert g["policy_hits"] == {"pii_output:redacted": 2, "refund_limit:blocked": 1}
    assert g["approvals"] == {"requested": 2, "granted": 1, "denied": 1, "expired": 0}
    assert sorted(g["approval_waits_ms"]) == [300, 1500]
    assert g["outcomes"] == {"success": 1, "aborted": 1, "timeout": 1}
    assert g["cost_usd"] == 1.25 and g["cost_per_success"] == 1.25  # failed runs' cost counts too
    # without a price table the unreported calls are counted, not guessed
    unpriced = truth(events)["groups"][("a", "1")]
    assert unpriced["cost_usd"] == 1.0 and unpriced["unpriced_llm_calls"] == 2
    assert truth(events, labels={"r2": {"loop": False}})["runs"]["r2"]["loop"] is False


def test_cost_per_success_is_none_without_successes():
    events = [{"event_id": "x", "ts": 1, "type": "run_end", "run_id": "r", "agent_id": "a",
               "agent_version": "1", "outcome": "failure"}]
    assert truth(events)["groups"][("a", "1")]["cost_per_success"] is None


def test_invalid_config_is_rejected():
    with pytest.raises(ValueError):
        run_labels(FleetConfig(canary=CanarySpec("nobody", "2")))
    with pytest.raises(ValueError):
        run_labels(FleetConfig(loop_fraction=1.5))
    with pytest.raises(ValueError):
        run_labels(FleetConfig(feedback_fraction=1.5))
    support = sim.default_agents()[0]
    for policy in (GuardrailPolicy("x", 0.1, (("warned", 1.0),), tool="run_tests"),  # not on its path
                   GuardrailPolicy("x", 0.1, (("ignored", 1.0),)),  # not a decision
                   GuardrailPolicy("x", 1.5, (("warned", 1.0),))):
        with pytest.raises(ValueError):
            run_labels(FleetConfig(agents=(replace(support, policies=(policy,)),)))


def test_cli_writes_jsonl(tmp_path):
    out = tmp_path / "fleet.jsonl"
    assert sim.main(["--runs", "20", "--seed", "7", "--out", str(out)]) == 0
    lines = out.read_text().splitlines()
    assert lines and {json.loads(line)["run_id"] for line in lines} == set(run_labels(FleetConfig(runs=20, seed=7)))


def test_genai_prices_fn_knows_the_models():
    pytest.importorskip("genai_prices")
    for model, (provider, _) in sim.MODELS.items():
        price = sim.genai_prices_fn(model, provider, 5000, 300, 1024)
        assert price is not None and price > 0, model


# --- governance: guardrails, approvals, feedback ----------------------------------------------------

GATED = {gate.action: gate.tool for agent in sim.default_agents() for gate in agent.approval_gates}


def own_hits(runs):
    """Runs where a guardrail fired on its own chance (not the block of a governed failure)."""
    return [r for r in runs if any(key != "refund_limit:blocked" for key in r["policy_hits"])]


def test_governance_rates_are_realistic(fleet):
    _, events, _ = fleet
    runs = truth(events)["runs"]
    assert sum(r["events"] for r in runs.values()) == len(events)
    n = len(runs)
    assert 0.04 < len([r for r in runs.values() if r["policy_hits"]]) / n < 0.12  # a few percent
    decisions = Counter()
    for r in runs.values():
        for key, count in r["policy_hits"].items():
            decisions[key.split(":")[1]] += count
    assert set(decisions) == set(sim.POLICY_DECISIONS)
    assert decisions["blocked"] < decisions["redacted"] and decisions["blocked"] < sum(decisions.values()) / 2
    # a guardrail blocks rarely on its own; most blocks are the governed failures (escalations)
    own_blocks = sum(count for r in runs.values() if r["outcome"] != "escalated"
                     for key, count in r["policy_hits"].items() if key.endswith(":blocked"))
    assert 0 < own_blocks < 0.1 * sum(decisions.values())

    approvals = Counter()
    for r in runs.values():
        approvals.update(r["approvals"])
    decided = approvals["granted"] + approvals["denied"] + approvals["expired"]
    assert decided == approvals["requested"] > 0.05 * n
    assert approvals["granted"] > 0.6 * decided and approvals["denied"] > approvals["expired"] > 0
    waits = sorted(w for r in runs.values() for w in r["approval_waits_ms"])
    assert len(waits) == decided and 1_000 < waits[len(waits) // 2] < 3_000 and waits[-1] < 60_000

    ended = [r for r in runs.values() if r["outcome"] != "timeout"]
    rated = [r for r in ended if r["feedback"]]
    assert 0.2 < len(rated) / len(ended) < 0.3 and all(r["feedback"] == 1 for r in rated)
    assert all(r["feedback"] == 0 for r in runs.values() if r["outcome"] == "timeout")
    assert mean(r["feedback_score"] for r in rated if r["outcome"] == "success") > 0.7
    assert mean(r["feedback_score"] for r in rated if r["outcome"] != "success") < 0.35


def test_escalated_runs_were_blocked_and_refused(fleet):
    _, events, _ = fleet
    runs = truth(events)["runs"]
    escalated = [r for r in runs.values() if r["outcome"] == "escalated"]
    assert len(escalated) > 30
    for r in escalated:
        assert r["policy_hits"].get("refund_limit:blocked") == 1
        assert r["approvals"]["denied"] + r["approvals"]["expired"] == 1 and r["approvals"]["granted"] == 0
    refused = [r for r in runs.values() if r["approvals"]["denied"] + r["approvals"]["expired"]]
    assert all(r["outcome"] == "escalated" for r in refused)


def test_approvals_are_decided_after_the_request_and_before_what_follows(fleet):
    _, events, _ = fleet
    decisions = 0
    for evs in by_run(events).values():
        waiting = []
        for i, e in enumerate(evs):
            if e["type"] != "approval":
                continue
            if e["status"] == "requested":
                waiting.append(e)
                continue
            asked = next(a for a in waiting if a["action"] == e["action"] and a["ts"] == e["ts"] - e["wait_ms"])
            waiting.remove(asked)
            assert e["wait_ms"] > 0
            later = [x for x in evs[i + 1:] if x["type"] in CORE]
            assert later and later[0]["ts"] > e["ts"]  # the run goes on after the decision
            if e["status"] == "granted":  # the gated call is the next one, begun after the decision
                call = next(x for x in later if x["type"] == "tool_call")
                assert call["tool"] == GATED[e["action"]] and call["ts"] - call["latency_ms"] > e["ts"]
            else:  # refused right after the call a guardrail blocked
                blocked = [x for x in evs[:i] if x["type"] in CORE][-1]
                assert blocked["type"] == "tool_call" and blocked["error_type"] == "policy_violation"
            decisions += 1
        assert not waiting  # every request was decided
    assert decisions > 100


def test_feedback_comes_at_run_end_or_within_the_configured_delay(fleet):
    _, events, _ = fleet
    ends = {e["run_id"]: e["ts"] for e in events if e["type"] == "run_end"}
    assert all(e["ts"] == ends[e["run_id"]] for e in events if e["type"] == "feedback")
    late = list(simulate(FleetConfig(runs=400, seed=2, feedback_delay_ms=30_000)))
    ends = {e["run_id"]: e["ts"] for e in late if e["type"] == "run_end"}
    delays = [e["ts"] - ends[e["run_id"]] for e in late if e["type"] == "feedback"]
    assert delays and all(0 <= d <= 30_000 for d in delays) and max(delays) > 20_000


@pytest.mark.parametrize("options", [
    {"canary": sim.DEFAULT_CANARY, "price_fn": linear_price},
    {"tool_args": False, "loop_fraction": 0.1, "timeout_fraction": 0.1, "feedback_delay_ms": 30_000},
])
def test_governance_only_adds_events(options):
    on = list(simulate(FleetConfig(runs=800, seed=13, **options)))
    off = list(simulate(FleetConfig(runs=800, seed=13, governance=False, **options)))
    assert all(e["type"] in CORE for e in off)
    assert Counter(e["type"] for e in on if e["type"] in GOVERNANCE).keys() == set(GOVERNANCE)
    assert [e for e in on if e["type"] in CORE] == off  # the same events, in the same order


def test_guardrail_multiplier_scales_the_hit_rate():
    support = sim.default_agents()[0]

    def fleet_at(multiplier):
        agent = replace(support, versions=(VersionSpec("v1", guardrail_multiplier=multiplier),))
        return list(simulate(FleetConfig(runs=2000, seed=3, agents=(agent,))))

    plain, tripping, none = fleet_at(1.0), fleet_at(4.0), fleet_at(0.0)
    assert [e for e in plain if e["type"] in CORE] == [e for e in tripping if e["type"] in CORE]
    hit = {m: {r["run_id"] for r in own_hits([{**v, "run_id": k} for k, v in truth(events)["runs"].items()])}
           for m, events in ((1, plain), (4, tripping), (0, none))}
    assert len(hit[4]) > 3 * len(hit[1]) > 0 and not hit[0]
    assert hit[1] <= hit[4]  # the same draws: a run that trips a guardrail still does when it is likelier


def test_the_demo_canary_trips_guardrails_more_often():
    assert sim.DEFAULT_CANARY.guardrail_multiplier > 1
    runs = truth(simulate(FleetConfig(runs=3000, seed=7, canary=sim.DEFAULT_CANARY)))["runs"]

    def rate(version):
        mine = [r for r in runs.values() if (r["agent_id"], r["agent_version"]) == ("support-bot", version)]
        return len(own_hits(mine)) / len(mine)

    assert rate(sim.DEFAULT_CANARY.version) > 2.5 * rate("v1.4.2") > 0


def test_a_timed_out_run_has_nothing_after_its_last_call():
    # an event after it would hold the run open longer and stretch it: guardrails made likely, runs cut short
    agents = tuple(replace(a, versions=tuple(replace(v, guardrail_multiplier=20.0) for v in a.versions))
                   for a in sim.default_agents())
    cfg = FleetConfig(runs=600, seed=4, timeout_fraction=0.5, agents=agents)
    labels = run_labels(cfg)
    last_hosts = 0
    for run_id, evs in by_run(simulate(cfg)).items():
        if labels[run_id]["timeout"]:
            core = [e for e in evs if e["type"] in CORE]
            assert all(e["ts"] <= core[-1]["ts"] for e in evs) and evs[-1]["type"] in CORE + ("policy_hit",)
            last_hosts += evs[-1]["type"] == "policy_hit"
    assert last_hosts > 10  # guardrails that fired on a timed-out run's last call
