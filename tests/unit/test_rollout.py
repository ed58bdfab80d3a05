"""Rollout state, canary decisions and budgets (streams/detect/rollout.py, streams/detect/policy.py), no services."""

import orjson
import pytest

from streams.contracts.events import InvalidEvent
from streams.detect.policy import Policy, PolicyError
from streams.detect.budgets import DAY_MS, HOUR_MS, PeriodBudgets
from streams.detect.rollout import RolloutController, Rollouts
from streams.contracts.deployments import parse_deployment
from streams.detect.runs import RunAssembler

T0 = 1_793_491_200_000  # 2026-11-01T00:00:00Z
MIN = 60_000
WINDOW = 5 * MIN


def run(i: int, version: str, ended: int, *, agent: str = "bot", success: bool = True, cost: float = 0.01,
        tenant: str = "acme", duration: int = 4_000) -> dict:
    return {"run_id": f"{agent}-{version}-{i}", "agent_id": agent, "agent_version": version, "tenant": tenant,
            "started_at": ended - duration, "ended_at": ended, "outcome": "success" if success else "failure",
            "cost_usd": cost, "loop_detected": False, "tool_calls": 3, "tool_errors": 0, "duration_ms": duration}


def fleet(n: int, start: int, *, canary_success: float = 0.85, canary_cost: float = 0.01,
          stable_success: float = 0.85) -> list[dict]:
    """n runs one every 10 s from `start`: stable v1, and a canary v2 taking 3 runs in 10.
    Successes are spread evenly in each arm (a low-discrepancy sequence), so rates are exact."""
    runs, seen = [], {"v1": 0, "v2": 0}
    for i in range(n):
        version = "v2" if i % 10 in (1, 4, 7) else "v1"
        rate = canary_success if version == "v2" else stable_success
        k = seen[version] = seen[version] + 1
        runs.append(run(i, version, start + i * 10_000, success=(k * rate) % 1 < rate,
                        cost=canary_cost if version == "v2" else 0.01))
    return runs


def test_parse_deployment_checks_every_field():
    event = parse_deployment(orjson.dumps({"agent_id": "bot", "version": "v2", "role": "canary", "traffic_pct": 10,
                                           "ts": "2026-11-01T00:00:00Z"}))
    assert event == {"agent_id": "bot", "version": "v2", "role": "canary", "traffic_pct": 10.0, "ts": T0}
    assert parse_deployment(orjson.dumps({"agent_id": "bot", "version": "v1", "role": "stable", "ts": T0}))[
        "traffic_pct"] == 100.0
    for bad, why in (({"agent_id": "bot", "version": "v2", "role": "beta", "ts": T0}, "role"),
                     ({"agent_id": "bot", "role": "canary", "ts": T0}, "version: required"),
                     ({"agent_id": "bot", "version": "v2", "role": "canary", "traffic_pct": 140, "ts": T0}, "traffic_pct"),
                     ({"agent_id": "bot", "version": "v2", "role": "canary", "ts": "soon"}, "ts")):
        with pytest.raises(InvalidEvent, match=why):
            parse_deployment(orjson.dumps(bad))
    with pytest.raises(InvalidEvent, match="JSON object"):
        parse_deployment(b"[1]")


def test_roles_inferred_from_traffic_without_deployments():
    rollouts = Rollouts(WINDOW)
    for r in fleet(120, T0):
        rollouts.observe(r)
    assert rollouts.stable("bot") == "v1"
    assert rollouts.canary_since("bot", "v2") is not None and rollouts.canary_since("bot", "v1") is None
    # a version first seen before the stable one is an old version, not a canary
    old = Rollouts(WINDOW)
    old.observe(run(0, "v0", T0 - MIN))
    for r in fleet(180, T0):  # roles are inferred on settled windows: a window is one once the next has ended
        old.observe(r)
    assert old.stable("bot") == "v1" and old.canary_since("bot", "v0") is None
    assert old.canary_since("bot", "v2") is not None


def test_declared_roles_rule_and_newest_stable_is_last_known_good():
    rollouts = Rollouts(WINDOW)
    for r in fleet(120, T0):
        rollouts.observe(r)
    rollouts.deploy({"agent_id": "bot", "version": "v0", "role": "stable", "traffic_pct": 100, "ts": T0 - DAY_MS})
    rollouts.deploy({"agent_id": "bot", "version": "v1", "role": "stable", "traffic_pct": 100, "ts": T0 - HOUR_MS})
    rollouts.deploy({"agent_id": "bot", "version": "v2", "role": "canary", "traffic_pct": 50, "ts": T0})
    assert rollouts.stable("bot") == "v1"
    assert rollouts.canary_since("bot", "v2") == T0
    assert rollouts.canary_baseline("bot", "v2") == "v1" and rollouts.canary_baseline("bot", "v0") is None
    rollouts.deploy({"agent_id": "bot", "version": "v2", "role": "canary", "traffic_pct": 0, "ts": T0 + HOUR_MS})
    assert rollouts.canary_since("bot", "v2") is None


def test_bad_canary_is_rolled_back_once_with_its_alerts():
    controller = RolloutController(Policy(), WINDOW)
    runs = fleet(1500, T0, canary_success=0.5)
    rollbacks, alerts, rows = [], [], []
    for i in range(0, len(runs), 30):  # one batch per 5 minutes
        rb, al, rw = controller.update(runs[i:i + 30])
        rollbacks += rb
        alerts += al
        rows += rw
    assert len(rollbacks) == 1
    decision = rollbacks[0]
    assert decision["from_version"] == "v2" and decision["to_version"] == "v1" and decision["agent_id"] == "bot"
    fired = [a for a in alerts if a["kind"] == "success_rate"]
    assert fired and set(decision["alert_ids"]) == {a["alert_id"] for a in alerts if a["status"] == "firing"}
    assert decision["evidence"]["decision"] == "rollback"
    assert rows[-1]["decision"] == "rollback" and rows[-1]["decided_at"] == decision["ts"]
    # decided early: far fewer canary runs than the fleet holds
    assert decision["evidence"]["canary_runs"] < 200
    # the same runs again (a restart replaying history), with the ids already sent: nothing new
    again = RolloutController(Policy(), WINDOW, sent={decision["rollback_id"], *decision["alert_ids"]})
    replayed = [again.update(runs[i:i + 30]) for i in range(0, len(runs), 30)]
    assert not any(rb for rb, _, _ in replayed) and not any(al for _, al, _ in replayed)
    # when deploy tooling takes the canary away, its alerts resolve once
    resolved = controller.deploy([{"agent_id": "bot", "version": "v2", "role": "canary", "traffic_pct": 0,
                                   "ts": T0 + DAY_MS}])
    firing = [a for a in alerts if a["status"] == "firing"]
    assert sorted(a["fingerprint"] for a in resolved) == sorted(a["fingerprint"] for a in firing)
    assert {a["status"] for a in resolved} == {"resolved"}
    assert controller.deploy([{"agent_id": "bot", "version": "v2", "role": "canary", "traffic_pct": 0,
                               "ts": T0 + DAY_MS + 1}]) == []


def test_canary_as_good_as_stable_is_promoted_not_rolled_back():
    controller = RolloutController(Policy(), WINDOW)
    runs = fleet(4000, T0)  # 1,200 canary runs: past max_runs
    rollbacks, rows = [], []
    for i in range(0, len(runs), 30):
        rb, _, rw = controller.update(runs[i:i + 30])
        rollbacks += rb
        rows += rw
    assert rollbacks == []
    assert rows[-1]["decision"] == "promote"


def _deployed(*roles: tuple[str, str, float, int]) -> list[dict]:
    return [{"agent_id": "bot", "version": v, "role": role, "traffic_pct": pct, "ts": ts} for v, role, pct, ts in roles]


def _play(controller: RolloutController, runs: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    rollbacks, alerts, rows = [], [], []
    for i in range(0, len(runs), 30):  # one batch per 5 minutes
        rb, al, rw = controller.update(runs[i:i + 30])
        rollbacks, alerts, rows = rollbacks + rb, alerts + al, rows + rw
    return rollbacks, alerts, rows


def test_a_shadow_deployment_gets_copies_of_all_traffic_unless_it_says():
    shadow = parse_deployment(orjson.dumps({"agent_id": "bot", "version": "v2", "role": "shadow", "ts": T0}))
    assert shadow == {"agent_id": "bot", "version": "v2", "role": "shadow", "traffic_pct": 100.0, "ts": T0}
    assert parse_deployment(orjson.dumps({"agent_id": "bot", "version": "v2", "role": "canary", "ts": T0}))[
        "traffic_pct"] == 0.0
    rollouts = Rollouts(WINDOW)
    for event in _deployed(("v1", "stable", 100, T0 - DAY_MS), ("v2", "shadow", 100, T0)):
        rollouts.deploy(event)
    assert rollouts.canary_since("bot", "v2") == T0 and rollouts.canary_baseline("bot", "v2") == "v1"
    assert rollouts.role("bot", "v2") == "shadow" and rollouts.role("bot", "v1") == "canary"
    rollouts.deploy(_deployed(("v2", "shadow", 0, T0 + HOUR_MS))[0])  # the mirror is turned off
    assert rollouts.canary_since("bot", "v2") is None


def test_a_bad_shadow_is_judged_like_a_canary_but_never_rolled_back():
    runs = fleet(1500, T0, canary_success=0.5)
    canary = RolloutController(Policy(), WINDOW)
    canary.deploy(_deployed(("v1", "stable", 100, T0 - DAY_MS), ("v2", "canary", 30, T0)))
    canary_rollbacks, canary_alerts, canary_rows = _play(canary, runs)
    shadow = RolloutController(Policy(), WINDOW)
    shadow.deploy(_deployed(("v1", "stable", 100, T0 - DAY_MS), ("v2", "shadow", 30, T0)))
    rollbacks, alerts, rows = _play(shadow, runs)

    assert len(canary_rollbacks) == 1 and rollbacks == [], "a shadow is never rolled back (so never paused)"
    # the same analysis, to the run: the verdict lands in `canaries`, marked as a shadow's
    assert rows[-1]["role"] == "shadow" and canary_rows[-1]["role"] == "canary"
    same = ("decision", "decided_at", "canary_runs", "stable_runs", "reason", "evidence", "since", "stable_version")
    assert rows[-1]["decision"] == "rollback"
    assert {k: rows[-1][k] for k in same} == {k: canary_rows[-1][k] for k in same}
    # what was worse is told, as a warning that asks for nothing, under fingerprints of its own
    assert alerts and {a["kind"] for a in alerts} == {a["kind"] for a in canary_alerts}
    assert {(a["severity"], a["status"], a.get("action", "")) for a in alerts} == {("warning", "firing", "")}
    assert {a["action"] for a in canary_alerts} == {"rollback"}
    assert not {a["fingerprint"] for a in alerts} & {a["fingerprint"] for a in canary_alerts}
    assert all(a["summary"].startswith("shadow bot v2 worse than v1") for a in alerts)
    # the mirror turned off: the condition is gone, its alerts resolve once
    resolved = shadow.deploy(_deployed(("v2", "shadow", 0, T0 + DAY_MS)))
    assert sorted(a["fingerprint"] for a in resolved) == sorted(a["fingerprint"] for a in alerts)
    assert {a["status"] for a in resolved} == {"resolved"}


def test_a_shadow_then_canary_gets_an_analysis_of_its_own():
    """A shadow found worse, then deployed as a canary anyway: the canary is judged afresh from
    its deployment, and rolled back on its own runs (the shadow's verdict decided nothing)."""
    controller = RolloutController(Policy(), WINDOW)
    controller.deploy(_deployed(("v1", "stable", 100, T0 - DAY_MS), ("v2", "shadow", 30, T0)))
    first = fleet(600, T0, canary_success=0.5)
    rollbacks, _, rows = _play(controller, first)
    assert rollbacks == [] and rows[-1]["decision"] == "rollback" and rows[-1]["role"] == "shadow"
    later = T0 + 2 * HOUR_MS
    controller.deploy(_deployed(("v2", "canary", 30, later)))
    second = [{**r, "run_id": r["run_id"] + "-live"} for r in fleet(1500, later, canary_success=0.5)]
    rollbacks, _, rows = _play(controller, second)
    assert len(rollbacks) == 1 and rollbacks[0]["from_version"] == "v2"
    assert rollbacks[0]["evidence"]["since"] == later and rows[-1]["role"] == "canary"
    # its canary runs only: none of the shadow's
    assert rollbacks[0]["evidence"]["canary_runs"] < 200
    (key,) = controller.canaries
    assert controller.canaries[key].since == later and controller.canaries[key].role == "canary"


def test_a_restart_keeps_a_shadow_a_shadow():
    runs = fleet(1500, T0, canary_success=0.5)
    deployments = _deployed(("v1", "stable", 100, T0 - DAY_MS), ("v2", "shadow", 30, T0))
    before = RolloutController(Policy(), WINDOW)
    before.deploy(deployments)
    landed: dict = {}
    for n in range(0, 60, 30):  # 18 shadow runs: pending
        _landed(landed, before.update(runs[n:n + 30])[2], n)
    assert [row["decision"] for row in landed.values()] == ["pending"]
    after = RolloutController(Policy(), WINDOW)
    after.deploy(deployments)
    after.restore([], landed.values())
    assert {c.role for c in after.canaries.values()} == {"shadow"}
    rollbacks, alerts, rows = _play(after, runs)  # the history replayed, then what follows
    assert rollbacks == [] and rows[-1]["decision"] == "rollback" and rows[-1]["role"] == "shadow"
    assert alerts and {a["severity"] for a in alerts} == {"warning"}


def test_budgets_per_agent_hour_and_per_tenant_day():
    policy = Policy.from_mapping({"budget": {"agent_hour_usd": 1.0}, "tenants": {"acme": {"day_usd": 2.5}}})
    budgets = PeriodBudgets(policy)
    runs = [run(i, "v1", T0 + i * MIN, cost=0.1) for i in range(130)]  # $6 an hour
    alerts = budgets.spend_agents(runs[:10])
    assert alerts == []  # $1.00 is not over $1
    alerts = budgets.spend_agents(runs[9:11])  # the 10th again (redelivered) counts once
    (hour,) = alerts
    assert hour["kind"] == "budget" and hour["status"] == "firing" and hour["agent_id"] == "bot"
    assert hour["evidence"]["runs"] == 11 and hour["evidence"]["spent_usd"] == pytest.approx(1.1)
    alerts = budgets.spend_agents(runs[11:130])
    # the second hour goes over at its 11th run; the first clears once runs end an hour after it
    assert [(a["status"], a["evidence"]["period_start"]) for a in alerts] == [
        ("firing", T0 + HOUR_MS), ("resolved", T0)]
    tenant = budgets.spend_tenants(runs[:26])
    assert len(tenant) == 1 and tenant[0]["evidence"]["spent_usd"] == pytest.approx(2.6)
    assert budgets.spend_tenants(runs[:30]) == []  # fires once per tenant and day


def test_run_cost_envelope_alerts_while_the_run_goes_on():
    assembler = RunAssembler(30 * MIN, run_budget=lambda agent: 0.05)
    base = {"run_id": "r1", "agent_id": "bot", "agent_version": "v1", "task_id": "", "session_id": "",
            "tenant": "", "environment": "", "type": "llm_call", "model": "m", "provider": "p", "input_tokens": 1,
            "output_tokens": 1, "cache_read_input_tokens": 0, "status": "ok", "error_type": "", "cost_usd": 0.03,
            "cost_source": "reported", "latency_ms": 1, "error_message": "", "tool": "", "args_hash": "", "outcome": "",
            "score": None, "policy": "", "decision": "", "wait_ms": None}  # a normalised event: every field
    assembler.apply([{**base, "event_id": "e1", "ts": T0}], 0)
    assert assembler.take_alerts() == []
    assembler.apply([{**base, "event_id": "e2", "ts": T0 + 1000}], 0)
    (alert,) = assembler.take_alerts()
    assert alert["kind"] == "budget" and alert["action"] == "stop_run" and alert["run_id"] == "r1"
    assembler.apply([{**base, "event_id": "e3", "ts": T0 + 2000}], 0)
    assert assembler.take_alerts() == []  # once per run
    assembler.apply([{**base, "event_id": "e4", "ts": T0 + 3000, "type": "run_end", "outcome": "success",
                      "score": None, "error_message": ""}], 0)
    assert [a["status"] for a in assembler.take_alerts()] == ["resolved"]


def test_policy_file_errors_are_clear(tmp_path):
    path = tmp_path / "policy.toml"
    path.write_text('[budget]\nrun_usd = "lots"\n')
    with pytest.raises(PolicyError, match="run_usd must be a non-negative number"):
        Policy.load(path)
    path.write_text('[agents.bot.canary]\nmin_runz = 3\n')
    with pytest.raises(PolicyError, match="canary policy of bot"):
        Policy.load(path)
    path.write_text('[agents.bot.budget]\nrun_usd = 0.5\n[tenants.acme]\nday_usd = 10\n')
    policy = Policy.load(path)
    assert policy.budget("bot", "run_usd") == 0.5 and policy.budget("other", "run_usd") == 5.0
    assert policy.tenant_day_usd("acme") == 10 and policy.tenant_budgets
    assert not Policy().tenant_budgets and Policy.load("") == Policy()


def test_the_shipped_policy_file_states_the_defaults():
    # infra/policy.toml documents every default: loading it must change nothing
    from pathlib import Path

    shipped = Policy.load(Path(__file__).parents[2] / "infra" / "policy.toml")
    assert shipped.canary("any") == Policy().canary("any")
    assert dict(shipped.budget_defaults) == dict(Policy().budget_defaults)


def test_inferred_roles_do_not_swap_on_noise():
    rollouts = Rollouts(WINDOW)
    # two versions at about 50/50: per 5-minute window 3-2, then 2-3, then 3-2, ...
    pattern = (["v1", "v2", "v1", "v2", "v1"] + ["v2", "v1", "v2", "v1", "v2"]) * 6
    for i, version in enumerate(pattern):
        rollouts.observe(run(i, version, T0 + i * 60_000 + (0 if version == "v1" else 1)))
        # asked at every run, as the controller does; none until the first window has settled
        assert rollouts.stable("bot") == ("v1" if i >= 10 else None), f"swapped at run {i}"
    # a version that clearly takes the traffic over becomes stable
    for i in range(len(pattern), len(pattern) + 40):
        rollouts.observe(run(i, "v3", T0 + i * 60_000))
        rollouts.stable("bot")
    assert rollouts.stable("bot") == "v3"


def test_every_canary_metric_can_raise_its_alert():
    from streams.contracts.alerts import KINDS
    from streams.detect.canary import METRICS
    from streams.detect.rollout import METRIC_KINDS

    assert set(METRICS) == set(METRIC_KINDS) and set(METRIC_KINDS.values()) <= set(KINDS)
    assert len(set(METRIC_KINDS.values())) == len(METRIC_KINDS)  # one alert (fingerprint) per metric


def test_a_canary_that_trips_guardrails_and_is_denied_more_has_an_alert_for_each():
    controller = RolloutController(Policy.from_mapping({"canary": {"rollback_on": ["guardrail_rate", "denial_rate"]}}),
                                   WINDOW)
    runs = fleet(1500, T0)
    for r in runs:
        k = int(r["run_id"].rsplit("-", 1)[1])
        bad = r["agent_version"] == "v2" and k % 4 == 0  # a quarter of the canary's runs, none of stable's
        r["policy_hits"] = {"pii:redacted": 1, "pii:allowed": 2} if bad else {"pii:allowed": 1}
        r["approvals_denied"] = int(bad)
    rollbacks, alerts = [], []
    for i in range(0, len(runs), 30):
        rb, al, _ = controller.update(runs[i:i + 30])
        rollbacks += rb
        alerts += al
    assert len(rollbacks) == 1
    assert sorted(a["kind"] for a in alerts) == ["denial", "guardrail"]
    assert len({a["fingerprint"] for a in alerts}) == 2 and set(rollbacks[0]["alert_ids"]) == {
        a["alert_id"] for a in alerts}


def test_a_canary_that_loops_and_slows_down_is_rolled_back_on_those_metrics():
    controller = RolloutController(Policy.from_mapping({"canary": {"rollback_on": ["loop_rate", "p95_duration"]}}),
                                   WINDOW)
    runs = fleet(1500, T0)
    for r in runs:
        if r["agent_version"] == "v2":
            r["loop_detected"] = int(r["run_id"].rsplit("-", 1)[1]) % 3 == 0
            r["duration_ms"] *= 3
    rollbacks, alerts = [], []
    for i in range(0, len(runs), 30):
        rb, al, _ = controller.update(runs[i:i + 30])
        rollbacks += rb
        alerts += al
    assert len(rollbacks) == 1
    assert {a["kind"] for a in alerts} <= {"loop_rate", "latency"} and alerts


def _support_bot_runs(seed: int) -> list[dict]:
    """support-bot's run rows of the restart test's fleet (~1.3 runs/min, a bad canary at 30%
    from the 30th minute), in arrival order."""
    from jobs.evaluate_drift import runs_from_events
    from jobs.simulate import DEFAULT_START_MS, CanarySpec, FleetConfig, simulate

    canary = CanarySpec("support-bot", "v1.6.0-rc1", share=0.3, success_rate=0.2, cost_multiplier=3.0,
                        start_ms=DEFAULT_START_MS + 30 * 60_000)
    rows = [r for r in runs_from_events(simulate(FleetConfig(seed=seed, runs=300, canary=canary)))
            if r["agent_id"] == "support-bot"]
    for row in rows:
        row["started_at"] = row["ended_at"] - row["duration_ms"]
    return sorted(rows, key=lambda r: (r["_arrival"], r["run_id"]))


def _landed(rows: dict, canaries: list[dict], now: int) -> None:
    for row in canaries:
        rows[(row["agent_id"], row["version"], row["stable_version"])] = {**row, "updated_at": now}


def test_a_restart_keeps_inferred_roles_and_each_canary_analysis():
    runs = _support_bot_runs(seed=21)
    batches = [runs[i:i + 5] for i in range(0, len(runs), 5)]  # a few runs per metrics message, as live
    live = RolloutController(Policy(), WINDOW)
    live_rollbacks, stables = [], []
    for batch in batches:
        live_rollbacks += live.update(batch)[0]
        stables.append(live.rollouts.stable("support-bot"))
    assert {s for s in stables if s} == {"v1.4.2"}, "the inferred stable version moved on noise"
    assert [r["from_version"] for r in live_rollbacks] == ["v1.6.0-rc1"]

    # the same stream with a restart after each third of it: state from what the store holds
    for cut in (len(batches) // 3, 2 * len(batches) // 3):
        before = RolloutController(Policy(), WINDOW)
        landed: dict = {}
        for n, batch in enumerate(batches[:cut]):
            rollbacks, _, rows = before.update(batch)
            _landed(landed, rows, n)
        seen = [r for batch in batches[:cut] for r in batch]
        versions = [{"agent_id": "support-bot", "agent_version": v,
                     "first_started_at": min(r["started_at"] for r in seen if r["agent_version"] == v)}
                    for v in {r["agent_version"] for r in seen}]
        after = RolloutController(Policy(), WINDOW, sent={r["rollback_id"] for r in live_rollbacks
                                                         if r["ts"] <= max(x["ended_at"] for x in seen)})
        after.restore(versions, landed.values())
        newest = max(r["ended_at"] for r in seen)
        # the history a restart replays, as the store returns it; shorter than the stream here, so
        # the replay alone cannot know when each version was first seen
        history = sorted((r for r in seen if r["ended_at"] >= newest - 45 * MIN), key=lambda r: (r["ended_at"], r["run_id"]))
        after.update(history)
        for batch in batches[cut:]:
            after.update(batch)
        assert after.rollouts.stable("support-bot") == "v1.4.2"
        assert {key: c.since for key, c in after.canaries.items()} == {key: c.since for key, c in live.canaries.items()}
        decided = {key: c.decided_at is not None for key, c in after.canaries.items()}
        assert decided[("support-bot", "v1.6.0-rc1", "v1.4.2")], f"restart after {cut} batches"


def test_the_kept_stable_version_is_the_one_computed_afresh():
    """Rollouts.stable keeps its answer until something it reads changes: after every step of
    random histories (late runs, gaps of windows, near-even versions, takeovers, deployments,
    restores), it answers what a Rollouts that computes it every time answers, in the same state."""
    import random

    for seed in range(12):
        rng = random.Random(seed)
        kept, fresh = Rollouts(WINDOW), Rollouts(WINDOW)
        newest = T0
        for i in range(700):
            step = rng.random()
            if step < 0.9:
                newest += rng.choice((0, 5_000, 30_000, 90_000, WINDOW, 3 * WINDOW + 1, 4 * WINDOW))
                late = rng.choice((0, 0, 0, WINDOW, 2 * WINDOW, 3 * WINDOW, 5 * WINDOW))
                version = rng.choice(("v1", "v2", "v2", "v3") if (i // 200) % 2 else ("v1", "v1", "v2", "v3"))
                r = run(i, version, newest - late, duration=rng.choice((100, 50_000, 900_000)))
                kept.observe(r)
                fresh.observe(r)
            elif step < 0.93:
                first = newest - rng.randrange(10 * WINDOW)
                version = rng.choice(("v1", "v2", "v3"))
                kept.restore("bot", version, first)
                fresh.restore("bot", version, first)
            elif step < 0.94:
                kept.infer("bot", "v2")
                fresh.infer("bot", "v2")
            elif step < 0.95 and seed % 3 == 0:
                event = {"agent_id": "bot", "version": rng.choice(("v1", "v2", "v3")),
                         "role": "stable" if i > 600 else "canary", "traffic_pct": 10, "ts": newest}
                kept.deploy(event)
                fresh.deploy(event)
            fresh.agents["bot"].known = False
            assert kept.stable("bot") == fresh.stable("bot"), (seed, i)
            version = rng.choice(("v1", "v2", "v3"))
            assert kept.canary_since("bot", version) == fresh.canary_since("bot", version)
            assert kept.agents["bot"].inferred == fresh.agents["bot"].inferred


def test_the_kept_stable_version_sees_late_runs_and_forgotten_windows():
    """What changes the inferred stable version without a new newest window: a late run into a
    settled window that completes a takeover, and a settled window forgotten as the newest run
    moves on within its window."""
    late = Rollouts(WINDOW)
    for i in range(3):
        late.observe(run(i, "v1", T0 + 1_000 + i))
    late.observe(run(3, "v1", T0 + 2 * WINDOW + 1_000))
    assert late.stable("bot") == "v1"
    for i in range(9):
        late.observe(run(10 + i, "v2", T0 + WINDOW + 1_000 + i))
    late.observe(run(4, "v1", T0 + 3 * WINDOW + 1_000))
    assert late.stable("bot") == "v1"  # 9 runs of v2 in the settled windows: not yet a takeover
    late.observe(run(19, "v2", T0 + WINDOW + 2_000))  # late, into a settled window: the 10th
    assert late.stable("bot") == "v2"

    forgotten = Rollouts(WINDOW)
    for i in range(20):
        forgotten.observe(run(i, "v2", T0 + 1_000 + i))
    for i in range(12):
        forgotten.observe(run(100 + i, "v1", T0 + WINDOW + 1_000 + i))
    forgotten.observe(run(200, "v1", T0 + 5 * WINDOW))
    assert forgotten.stable("bot") == "v2"
    forgotten.observe(run(201, "v1", T0 + 5 * WINDOW + 1_000))  # the first window is forgotten
    assert forgotten.stable("bot") == "v1"


def test_a_canary_known_late_counts_both_arms_runs_since_it_started():
    """Roles inferred from traffic come once a window has settled: the runs of both arms that
    ended since the canary started, seen before it was known, come from the agent's backlog."""
    controller = RolloutController(Policy(), WINDOW)
    runs = fleet(240, T0)  # 40 minutes, even arms: the verdict stays pending
    known_at = None  # the canary's first row: when it became known
    for r in runs:
        _, _, rows = controller.update([r])
        known_at = known_at or (rows[0] if rows else None)
    since = controller.rollouts.canary_since("bot", "v2")
    assert since is not None and known_at is not None
    expected = {version: sum(1 for r in runs if r["agent_version"] == version and r["ended_at"] >= since)
                for version in ("v1", "v2")}
    (canary,) = controller.canaries.values()
    assert canary.verdict.decision == "pending"
    assert (canary.verdict.canary_runs, canary.verdict.stable_runs) == (expected["v2"], expected["v1"])
    assert known_at["canary_runs"] > 1, "the first analysis had the backlog's canary runs"
