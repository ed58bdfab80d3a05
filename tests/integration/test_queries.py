"""The saved queries (`sql/queries/*.sql`), the notebooks (`notebooks/*.ipynb`) and the Grafana
dashboards' queries (`infra/grafana/*.json`) against one store filled once: a real `trackside up`, a simulated fleet (the demo's: three agents, a bad
canary of support-bot with its deployment events, loops, failures, timeouts, malformed lines,
redelivered duplicates) and a budget policy that some of it goes over.

The queries run through the running stack's query service, then again on the stopped data dir
(opened directly, in another process, as `trackside sql` does without `up`); the notebooks run
on the stopped data dir; every dashboard panel's query runs as Grafana's ClickHouse data source
sends it (tests/grafana.py). `TRACKSIDE_SAVE_NOTEBOOKS=1` writes the executed notebooks back with
their outputs (how the committed ones were made).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import orjson
import numpy as np
import pytest

from jobs.demo import MALFORMED, demo_deployments
from jobs.publish import agent_key, publish_lines
from jobs.simulate import DEFAULT_CANARY, FleetConfig, default_agents, genai_prices_fn, run_labels, simulate, truth
from streams.contracts import topics
from streams.detect.canary import METRICS
from streams.detect.drift import NUMERIC
from streams.store.saved_queries import PARAM
from streams.store.saved_queries import load_query as saved_query
from tests.conftest import RunningStack

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
QUERIES = ROOT / "sql" / "queries"
NOTEBOOKS = ROOT / "notebooks"

RUNS, SEED = 600, 7
STEP_MS = 300_000  # events are published in slices of this much event time (one metrics window)
POLICY = """
[agents.coder.budget]
agent_hour_usd = 6.0
[tenants.acme]
day_usd = 8.0
"""
CODER_HOUR_USD, ACME_DAY_USD = 6.0, 8.0

# --- the saved queries: `-- @param name Type default` lines give every parameter's default --------

TABLES = {"events", "runs", "agent_metrics", "dead_letters", "alerts", "rollbacks", "drift", "failure_clusters",
          "deployments", "canaries"}
PLACEHOLDER = re.compile(r"\{(\w+):([^}]+)\}")


def load_query(name: str) -> tuple[str, dict]:
    return saved_query(QUERIES / f"{name}.sql")


def query_names() -> list[str]:
    return sorted(path.stem for path in QUERIES.glob("*.sql"))


# --- filling the store ------------------------------------------------------------------------------


class Filled:
    """A running stack with the fleet in it, and what was sent."""

    def __init__(self, stack: RunningStack, config: FleetConfig, events: list[dict]) -> None:
        self.stack = stack
        self.config = config
        self.labels = run_labels(config)
        self.truth = truth(events, genai_prices_fn, self.labels)
        self.running_results: dict[str, list[dict]] = {}

    def run(self, name: str, **params) -> list[dict]:
        sql, defaults = load_query(name)
        assert set(params) <= set(defaults), f"{name}: unknown parameters {set(params) - set(defaults)}"
        return self.stack.query(sql, {**defaults, **params})


def publish_fleet(stack: RunningStack, config: FleetConfig) -> list[dict]:
    """Deployments first, then the events in slices of event time, each slice once the previous
    one's runs have landed: live traffic arrives spread out like that. Published all at once, the
    run assembler's partitions run minutes of event time apart, and the drift tests (whose
    watermark is the newest run seen) drop the lagging partitions' runs as late."""
    settings = stack.settings
    deployments = [orjson.dumps(d) for d in demo_deployments(config)]
    report = publish_lines(settings, deployments, topic=topics.AGENT_DEPLOYMENTS.name, key=agent_key)
    assert report.produced == len(deployments)
    events = list(simulate(config))
    slices: dict[int, list[dict]] = {}
    for event in events:
        slices.setdefault((event["ts"] - config.start_ms) // STEP_MS, []).append(event)
    ended = 0
    for number, key in enumerate(sorted(slices)):
        lines = [orjson.dumps(event) for event in slices[key]]
        if number == len(slices) // 2:
            lines += list(MALFORMED)  # bad producers: each must end in the dead letters
        report = publish_lines(settings, lines)
        assert report.rejected == 0, report.errors
        ended += sum(event["type"] == "run_end" for event in slices[key])
        stack.wait_for_count("SELECT count() FROM runs WHERE closed_by = 'run_end'", ended, timeout=30)
    report = publish_lines(settings, [orjson.dumps(event) for event in events[:50]])  # redelivered
    assert report.rejected == 0
    return events


@pytest.fixture(scope="module")
def filled(tmp_path_factory) -> Filled:
    data_dir = tmp_path_factory.mktemp("queries")
    policy = data_dir / "policy.toml"
    policy.write_text(POLICY)
    stack = RunningStack(data_dir, {"TRACKSIDE_POLICY_FILE": str(policy)})
    stack.start()
    try:
        config = FleetConfig(seed=SEED, runs=RUNS, canary=DEFAULT_CANARY, price_fn=genai_prices_fn)
        events = publish_fleet(stack, config)
        expected = len(run_labels(config))
        assert stack.wait_for_count("SELECT count() FROM runs", expected, timeout=60) == expected
        assert stack.wait_for_count("SELECT count() FROM dead_letters", len(MALFORMED), timeout=30) == len(MALFORMED)
        # the canary's verdict and the rollback come with the runs that decide them
        assert stack.wait_for_count("SELECT count() FROM rollbacks", 1, timeout=30) == 1
        stack.wait_until_processed()  # the alerts, drift tests and verdicts of the last runs too
        yield Filled(stack, config, events)
    finally:
        stack.stop()


# --- every query --------------------------------------------------------------------------------------


def test_every_query_documents_its_parameters_and_applies_final():
    names = query_names()
    assert len(names) >= 9
    for name in names:
        sql, defaults = load_query(name)
        header = sql.split("\n\n", 1)[0]
        assert header.startswith("-- ") and len(header.splitlines()) >= 5, f"{name}: no header comment"
        body = "\n".join(line for line in sql.splitlines() if not line.lstrip().startswith("--"))
        used = {n: t for n, t in PLACEHOLDER.findall(body)}
        assert set(used) == set(defaults), f"{name}: parameters used {sorted(used)} vs documented {sorted(defaults)}"
        declared = {n: t for n, t, _ in PARAM.findall(sql)}
        assert used == declared, f"{name}: types differ between use and documentation"
        for table, final in re.findall(r"\b(?:FROM|JOIN)\s+([a-z_]+)(?:\s+AS\s+\w+)?(\s+FINAL\b)?", body):
            if table in TABLES:
                assert final, f"{name}: {table} read without FINAL"


@pytest.mark.parametrize("name", query_names())
def test_every_query_returns_rows(filled: Filled, name: str):
    rows = filled.run(name)
    assert rows, f"{name} returned nothing"
    filled.running_results[name] = rows


# --- what each query says ---------------------------------------------------------------------------


def _stored_runs(filled: Filled) -> dict[tuple[str, str], dict]:
    rows = filled.stack.query(
        "SELECT agent_id, agent_version, count() AS n, countIf(outcome = 'success') AS ok, "
        "toFloat64(sum(cost_usd)) AS cost, countIf(loop_detected) AS loops FROM runs FINAL GROUP BY ALL")
    return {(r["agent_id"], r["agent_version"]): r for r in rows}


def test_cost_per_success_by_version(filled: Filled):
    rows = filled.run("cost_per_success_by_version")
    versions = {(r["agent_id"], r["agent_version"]) for r in rows}
    assert versions == set(filled.truth["groups"])
    for r in rows:
        assert r["bucket_start"].endswith(":00:00"), "hourly buckets by default"
        assert 0 <= r["successes"] <= r["runs"] and r["failures"] == r["runs"] - r["successes"]
        assert math.isclose(r["success_rate"], r["successes"] / r["runs"])
        assert r["cost_usd"] > 0
        if r["successes"]:
            assert math.isclose(r["cost_per_success"], r["cost_usd"] / r["successes"], rel_tol=1e-9)
        else:
            assert r["cost_per_success"] is None
        assert 0 <= r["final_windows"] <= r["windows"] <= 12
    # over the whole span, each version's numbers are those of its runs (windows miss late runs only)
    for key, expected in filled.truth["groups"].items():
        mine = [r for r in rows if (r["agent_id"], r["agent_version"]) == key]
        counted = sum(r["runs"] for r in mine)
        assert 0.9 * expected["runs"] <= counted <= expected["runs"], key
        rate = sum(r["successes"] for r in mine) / counted
        assert abs(rate - expected["success_rate"]) < 0.05, key
        per_success = sum(r["cost_usd"] for r in mine) / sum(r["successes"] for r in mine)
        assert per_success == pytest.approx(expected["cost_per_success"], rel=0.1), key
    # the canary pays more per successful task than its stable version, in the same hours
    by_hour = {(r["agent_version"], r["bucket_start"]): r for r in rows if r["agent_id"] == "support-bot"}
    canary_hours = [hour for version, hour in by_hour if version == DEFAULT_CANARY.version]
    assert canary_hours
    for hour in canary_hours:
        assert by_hour[(DEFAULT_CANARY.version, hour)]["cost_per_success"] > 1.3 * by_hour[("v1.4.2", hour)][
            "cost_per_success"]
    # a parameter narrows the answer
    narrow = filled.run("cost_per_success_by_version", agent_id="coder", bucket_seconds=900)
    assert {r["agent_id"] for r in narrow} == {"coder"}
    assert len(narrow) > len([r for r in rows if r["agent_id"] == "coder"])


def test_guardrail_hits(filled: Filled):
    # a look-back over the whole fleet: every hit is in it, none in the baseline
    rows = filled.run("guardrail_hits", days=60)
    assert rows and all(r["baseline_share"] is None and r["lift"] is None for r in rows)
    groups = filled.truth["groups"]
    found = {(r["agent_id"], r["agent_version"], f"{r['policy']}:{r['decision']}"): r for r in rows}
    expected = {(agent, version, key): hits for (agent, version), g in groups.items()
                for key, hits in g["policy_hits"].items()}
    assert {key: row["hits"] for key, row in found.items()} == expected
    for (agent, version, _), row in found.items():
        assert 0 < row["runs_hit"] <= row["hits"] and row["version_runs"] == groups[(agent, version)]["runs"]
        assert row["share"] == pytest.approx(row["runs_hit"] / row["version_runs"], abs=1e-4)
    assert [r["decision"] for r in rows][:1] == ["blocked"], "blocked first"

    def acted(version: str) -> float:  # share of the version's runs a guardrail acted on, summed over policies
        return sum(r["share"] for r in rows if r["agent_id"] == "support-bot" and r["agent_version"] == version
                   and r["decision"] != "allowed")

    # the demo's canary trips its guardrails far more often than its stable version
    assert acted(DEFAULT_CANARY.version) > 2 * acted("v1.4.2")


def test_escalations(filled: Filled):
    rows = filled.run("escalations", days=60, bucket_seconds=60 * 86_400)
    groups = filled.truth["groups"]
    assert {(r["agent_id"], r["agent_version"]) for r in rows} == set(groups)
    for r in rows:
        g = groups[(r["agent_id"], r["agent_version"])]
        assert r["runs"] == g["runs"] and r["escalations"] == g["outcomes"].get("escalated", 0)
        assert {status: r[f"approvals_{status}"] for status in g["approvals"]} == g["approvals"]
        waits = sorted(g["approval_waits_ms"])
        if waits:
            assert r["approval_wait_p50_ms"] == pytest.approx(float(np.median(waits)), rel=1e-6)
        else:
            assert r["approval_wait_p50_ms"] is None
        if g["feedback"]:
            assert r["feedback_score"] == pytest.approx(g["feedback_score"], abs=1e-4)
        if r["escalations"]:
            assert 0 < r["escalation_steps_p50"] <= r["escalation_steps_p95"]
    assert sum(r["escalations"] for r in rows) > 0 and sum(r["approvals_denied"] for r in rows) > 0


def test_top_failure_clusters(filled: Filled):
    rows = filled.run("top_failure_clusters")
    assert len(rows) >= 8
    counts = [r["runs_in_period"] for r in rows]
    assert counts == sorted(counts, reverse=True)
    clustered = {r["cid"]: r["n"] for r in filled.stack.query(
        "SELECT failure_cluster_id AS cid, count() AS n FROM runs FINAL WHERE failure_cluster_id != '' GROUP BY cid")}
    for r in rows:
        assert r["label"] and r["cluster_id"].startswith("fc-") and r["kind"]
        assert r["runs_in_period"] == clustered[r["cluster_id"]] <= r["runs_total"]
        assert r["versions"] and r["agents"] and 0 < r["share_of_failures"] <= 1
        parts = {part.rsplit(": ", 1)[0]: int(part.rsplit(": ", 1)[1]) for part in r["by_agent_version"]}
        assert sum(parts.values()) == r["runs_total"] and set(parts) >= set(r["versions"])
        assert "success" not in r["outcomes"]
        assert r["example_run_ids"] and r["recent_run_ids"]
        examples = filled.stack.query(
            "SELECT run_id, agent_id, outcome, failure_cluster_id FROM runs FINAL WHERE run_id IN {ids:Array(String)}",
            {"ids": r["example_run_ids"] + r["recent_run_ids"]})
        assert len(examples) == len(set(r["example_run_ids"] + r["recent_run_ids"]))
        for example in examples:
            assert example["failure_cluster_id"] == r["cluster_id"] and example["outcome"] != "success"
            assert example["agent_id"] in {version.split("/")[0] for version in parts}
    assert sum(r["share_of_failures"] for r in rows) <= 1.0001
    # the loops of every agent are one mode (the simulator's other families belong to one agent each)
    loops = [r for r in rows if r["kind"] == "loop"]
    assert len(loops) == 1 and len(loops[0]["agents"]) == 3
    only = filled.run("top_failure_clusters", agent_id="research-agent", limit=2)
    assert len(only) == 2 and all(r["agents"] == ["research-agent"] for r in only)


def test_failure_cluster_trend_adds_up_to_the_top_clusters(filled: Filled):
    top = {r["cluster_id"]: r for r in filled.run("top_failure_clusters", limit=100)}
    rows = filled.run("failure_cluster_trend", top=5)
    assert len({r["cluster_id"] for r in rows}) == 5
    per_cluster = Counter()
    for r in rows:
        assert 0 < r["runs"] <= r["runs_of_agent"] and 0 < r["share"] <= 1
        assert r["label"] == top[r["cluster_id"]]["label"]
        per_cluster[r["cluster_id"]] += r["runs"]
    for cluster_id, runs in per_cluster.items():
        assert runs == top[cluster_id]["runs_in_period"]
    largest = sorted(top.values(), key=lambda r: -r["runs_in_period"])[:5]
    assert min(r["runs_in_period"] for r in largest) <= min(per_cluster.values())


def test_loops_by_tool(filled: Filled):
    rows = filled.run("loops_by_tool")
    stored = _stored_runs(filled)
    looped = sum(r["loops"] for r in stored.values())
    injected = sum(label["loop"] for label in filled.labels.values())
    assert sum(r["loops"] for r in rows) == looped
    assert looped >= 0.9 * injected > 0
    agent_tools = {a.agent_id: set(a.tools) for a in default_agents()}
    for r in rows:
        assert r["rule"] in ("repeat", "cycle", "step_budget"), "every looping run has its loop alert"
        assert set(r["tool"].split(" > ")) <= agent_tools[r["agent_id"]]
        assert 0 < r["loop_rate"] <= 1 and r["loops"] <= r["runs_with_tool"]
        assert r["cost_usd"] > 0 and r["avg_steps"] >= 3
        assert "success" not in r["outcomes"]
        assert 1 <= len(r["example_run_ids"]) <= 3
    loops = [r["loops"] for r in rows]
    assert loops == sorted(loops, reverse=True)


def test_drift_history(filled: Filled):
    rows = filled.run("drift_history", agent_id="support-bot")
    assert {r["agent_id"] for r in rows} == {"support-bot"}
    versions = {r["agent_version"] for r in rows}
    assert {"v1.4.2", DEFAULT_CANARY.version} <= versions
    for r in rows:
        halves = r["scale"].endswith((".early", ".late"))
        assert r["test"] in ("ks", "chi2", "fisher") and r["scale"].split(".")[0] in ("long", "short", "mid")
        assert r["test"] != "fisher" or (halves and r["feature"] == "success"), "Fisher: a half's success rate"
        assert 0 <= r["p_value"] <= 1 and 0 < r["bh_threshold"] < 1
        assert r["effect_ratio"] >= 0
        numeric = r["feature"] in NUMERIC
        assert (r["wasserstein"] is not None) == numeric and (r["psi"] is not None) == numeric
        assert (r["js"] is not None) == (not numeric)
        if r["drifted"]:
            assert r["p_value"] <= r["bh_threshold"]  # a half's threshold is its one-sided level
        if r["agent_version"] == DEFAULT_CANARY.version:
            assert r["baseline"].startswith("v1.4.2 stable"), "a canary is compared with its stable version"
        else:
            assert "trailing" in r["baseline"]
    # the canary's tokens (x1.5) and cost per run are far from its stable version's
    canary = [r for r in rows if r["agent_version"] == DEFAULT_CANARY.version and r["drifted"]]
    assert {r["feature"] for r in canary} & {"cost_usd", "total_tokens"}
    one = filled.run("drift_history", agent_id="support-bot", agent_version="v1.4.2", feature="cost_usd")
    assert one and {(r["agent_version"], r["feature"]) for r in one} == {("v1.4.2", "cost_usd")}
    windows = [r["window"] for r in one]
    assert windows == sorted(windows)


def test_slowest_tool_paths(filled: Filled):
    rows = filled.run("slowest_tool_paths")
    assert 5 <= len(rows) <= 20
    p95 = [r["p95_duration_ms"] for r in rows]
    assert p95 == sorted(p95, reverse=True)
    agent_tools = {a.agent_id: set(a.tools) for a in default_agents()}
    for r in rows:
        assert r["runs"] >= 5 and 0 < r["share_of_runs"] <= 1
        assert 0 < r["p50_duration_ms"] <= r["p95_duration_ms"]
        tools = r["path"].split(" > ")
        assert set(tools) <= agent_tools[r["agent_id"]]
        assert all(a != b for a, b in itertools.pairwise(tools)), "immediate repeats are collapsed"
        assert r["avg_tool_calls"] >= len(tools) and r["vs_agent_p50"] > 0
    coder = filled.run("slowest_tool_paths", agent_id="coder", min_runs=1, limit=1000)
    assert sum(r["share_of_runs"] for r in coder) == pytest.approx(1, abs=0.01)


def test_canary_against_stable(filled: Filled):
    rows = filled.run("canary_vs_stable")
    canary = [r for r in rows if r["agent_id"] == "support-bot" and r["canary_version"] == DEFAULT_CANARY.version]
    assert {r["metric"] for r in canary} == set(METRICS)
    for r in canary:
        assert r["stable_version"] == "v1.4.2" and not r["inferred"]
        assert r["decision"] == "rollback" and r["decided_at"] is not None
        assert r["rolled_back_to"] == "v1.4.2" and r["rolled_back_at"] == r["decided_at"]
        assert r["since"].startswith("2026-11-01 01:00:00")
        assert r["n_canary"] >= 20 and r["n_stable"] >= 20
        # recomputed from runs over the same span, the arms agree with what the test saw, up to the
        # runs that ended before the decision but landed after it (the assembler's partitions run
        # a few seconds of event time apart)
        for arm in ("canary", "stable"):
            assert abs(r[f"observed_n_{arm}"] - r[f"n_{arm}"]) <= max(3, 0.12 * r[f"n_{arm}"])
        if r["metric"] in ("success_rate", "cost_per_success", "tool_error_rate"):
            assert r["observed_canary"] == pytest.approx(r["test_canary"], rel=0.15, abs=0.02)
            assert r["observed_stable"] == pytest.approx(r["test_stable"], rel=0.15, abs=0.02)
        if r["metric"] in ("guardrail_rate", "denial_rate"):  # rare events: a run or two more moves them
            assert r["observed_canary"] == pytest.approx(r["test_canary"], abs=0.05)
            assert r["observed_stable"] == pytest.approx(r["test_stable"], abs=0.05)
    worse = [r for r in canary if r["worse"]]
    assert worse, "a rollback names at least one metric shown worse"
    for r in worse:
        assert r["p_value"] < r["alpha"] and r["metric"] in r["reason"]
    cost = next(r for r in canary if r["metric"] == "cost_per_success")
    assert cost["test_canary"] > cost["test_stable"]
    assert {r["agent_id"] for r in filled.run("canary_vs_stable", agent_id="coder")} <= {"coder"}


def test_dead_letters_by_reason(filled: Filled):
    rows = filled.run("dead_letters_by_reason")
    assert sum(r["messages"] for r in rows) == len(MALFORMED)
    reasons = {r["reason"] for r in rows}
    assert "field 'type': must be one of run_start, llm_call, tool_call, run_end, approval, policy_hit, feedback; " \
           "got <value>" in reasons
    assert any(r["reason"].startswith("field 'input_tokens'") and r["agent_id"] == "coder" for r in rows)
    for r in rows:
        assert r["topic"] == "agent.events" and r["example_source"].startswith("agent.events:")
        assert r["example_payload"] and r["first_received"] <= r["last_received"]


def test_alerts_firing(filled: Filled):
    rows = filled.run("alerts_firing")
    every = filled.stack.query("SELECT fingerprint, status, ts, kind, evidence FROM alerts FINAL")
    last = {}
    for a in sorted(every, key=lambda a: (a["ts"], a["status"] == "resolved")):
        last[a["fingerprint"]] = a
    firing = {fp for fp, a in last.items() if a["status"] == "firing"}
    notices = {fp for fp in firing if last[fp]["kind"] == "failure_cluster"
               and json.loads(last[fp]["evidence"])["condition"] == "new"}
    assert {r["fingerprint"] for r in rows} == firing - notices
    assert not [r for r in rows if r["kind"] == "loop"], "every looping run ended, so its loop alert resolved"
    rollback = [r for r in rows if r["action"] == "rollback"]
    assert rollback and {(r["agent_id"], r["agent_version"]) for r in rollback} == {
        ("support-bot", DEFAULT_CANARY.version)}
    severities = [["critical", "warning", "info"].index(r["severity"]) for r in rows]
    assert severities == sorted(severities)
    with_notices = filled.run("alerts_firing", include_notices=1)
    assert len(with_notices) == len(firing) > len(rows)
    assert {r["kind"] for r in filled.run("alerts_firing", kind="cost")} <= {"cost"}


def test_budget_burn(filled: Filled):
    rows = filled.run("budget_burn")
    runs = filled.stack.query("SELECT toFloat64(sum(cost_usd)) AS cost, countIf(tenant != '') AS tenanted, "
                              "count() AS n FROM runs FINAL")[0]
    for scope in ("agent_hour", "tenant_day"):
        mine = [r for r in rows if r["scope"] == scope]
        assert sum(r["spent_usd"] for r in mine) == pytest.approx(runs["cost"], rel=1e-6)
    coder = next(r for r in rows if r["scope"] == "agent_hour" and r["subject"] == "coder"
                 and r["period_start"] == "2026-11-01 00:00:00")
    assert coder["limit_usd"] == CODER_HOUR_USD and coder["burn"] > 1 and coder["alerted_at"] is not None
    acme = next(r for r in rows if r["scope"] == "tenant_day" and r["subject"] == "acme")
    assert acme["limit_usd"] == ACME_DAY_USD and acme["burn"] > 1 and acme["alert_status"] == "firing"
    assert 0 < acme["elapsed_fraction"] < 0.2 and acme["projected_usd"] > acme["spent_usd"]
    burns = [r["burn"] for r in rows if r["burn"] is not None]
    assert burns == sorted(burns, reverse=True)
    for r in rows:
        if r["alerted_at"] is not None:
            assert r["spent_usd"] > r["limit_usd"]
    # with limits passed in, every period has one
    given = filled.run("budget_burn", agent_hour_usd=100.0, tenant_day_usd=100.0)
    assert all(r["limit_usd"] == 100.0 for r in given)


# --- the Grafana dashboards (infra/grafana): every panel's query as the ClickHouse data source sends it --

TIME = ["time"]
GRAFANA_ALL = ["$__all"]  # the agent picker on All
GRAFANA_COLUMNS = {
    "trackside-fleet.json": {
        "Runs": ["runs_ended"], "Success rate": ["success_rate"], "Cost per successful task": ["cost_per_success"],
        "Spend": ["spend_usd"],
        "Runs per agent version": TIME + ["version", "runs_ended"],
        "Success rate per agent version": TIME + ["version", "success_rate"],
        "Cost per successful task per agent version": TIME + ["version", "cost_per_success"],
        "p95 run duration per agent version": TIME + ["version", "p95_duration_ms"],
        "Loop rate per agent version": TIME + ["version", "loop_share"],
        "Tool error rate per agent version": TIME + ["version", "tool_error_rate"],
        "Agent versions in the range": ["agent_id", "agent_version", "runs_ended", "success_rate", "cost_per_success",
                                        "p95_duration_ms", "loop_rate", "tool_error_rate", "spend_usd"],
    },
    "trackside-alerts.json": {
        "Alerts fired, by kind": TIME + ["kind", "fired"],
        "Firing now": ["ts", "kind", "severity", "agent_id", "agent_version", "run_id", "summary"],
        "Alerts in the range": ["ts", "kind", "severity", "status", "agent_id", "agent_version", "run_id", "summary"],
        "Canary analyses": ["agent_id", "canary", "stable", "verdict", "canary_runs", "stable_runs", "since",
                            "decided_at", "reason"],
        "Canaries against their stable versions: success rate": TIME + ["version", "success_rate"],
        "Canaries against their stable versions: cost per successful task": TIME + ["version", "cost_per_success"],
        "Rollbacks": ["ts", "agent_id", "from_version", "to_version", "reason", "alerts_behind"],
        "Deployments": ["ts", "agent_id", "version", "role", "traffic_pct"],
        "Controls issued": ["ts", "action", "agent_id", "agent_version", "run_id", "issued_by", "reason"],
    },
    "trackside-pipeline.json": {
        "Events landed per second, by type": TIME + ["type", "events_per_s"],
        "Event time to landing": TIME + ["p50_delay_s", "p95_delay_s"],
        "Dead letters, by topic": TIME + ["topic", "messages"],
        "Dead-letter rate": TIME + ["dead_letter_rate"],
        "Dead letters by reason": ["topic", "reason", "messages", "bytes", "last_received", "example_source",
                                   "example_payload"],
        "Runs closed, by how": TIME + ["closed_by", "runs_closed"],
        "Stage watermarks": ["stage", "partition", "newest_watermark", "recorded_at", "behind_s"],
    },
}


def test_every_dashboard_panel_is_expected():
    from tests import grafana

    found = {name: {panel["title"] for panel in grafana.panels(board)} for name, board in grafana.dashboards().items()}
    assert found == {name: set(columns) for name, columns in GRAFANA_COLUMNS.items()}


def _grafana_range(filled: Filled) -> tuple[int, int]:
    """From the fleet's first run to now: the panels on event time (runs, alerts, windows) and those
    on the wall clock (when events and dead letters landed) both fall in it."""
    (first,) = filled.stack.query("SELECT toUnixTimestamp64Milli(min(started_at)) AS ms FROM runs FINAL")
    return int(first["ms"]) - 3_600_000, time.time_ns() // 1_000_000 + 300_000


@pytest.mark.parametrize("agents", [GRAFANA_ALL, ["support-bot"], ["support-bot", "coder"]],
                         ids=["all agents", "one agent", "two agents"])
def test_every_dashboard_panel_returns_rows(filled: Filled, agents: list[str]):
    from tests import grafana

    start_ms, end_ms = _grafana_range(filled)
    for name, board in grafana.dashboards().items():
        for variable in grafana.variables(board):
            if variable["type"] == "query":  # the agent picker's own query
                options = filled.stack.query(grafana.query(variable["query"], start_ms, end_ms, {}))
                assert {row["agent_id"] for row in options} == {a.agent_id for a in default_agents()}, name
        for panel in grafana.panels(board):
            expected = GRAFANA_COLUMNS[name][panel["title"]]
            for target in panel["targets"]:
                sql = grafana.query(target["rawSql"], start_ms, end_ms, {"agent": agents})
                assert "$" not in sql, (name, panel["title"], sql)
                rows = filled.stack.query(sql)
                assert rows, f"{name}: {panel['title']!r} returned nothing ({agents})\n{sql}"
                assert list(rows[0]) == expected, (name, panel["title"])
                if agents != GRAFANA_ALL and "agent_id" in expected:
                    assert {row["agent_id"] for row in rows} <= set(agents), (name, panel["title"])
                if panel["type"] == "stat":
                    assert len(rows) == 1 and rows[0][expected[0]] is not None, (name, panel["title"])


def test_a_dashboard_panel_agrees_with_the_store(filled: Filled):
    """The fleet dashboard's table over the whole span: each version's runs as stored, and its
    Runs series adds up to the same over the intervals."""
    from tests import grafana

    start_ms, end_ms = _grafana_range(filled)
    board = grafana.dashboards()["trackside-fleet.json"]
    by_title = {panel["title"]: panel["targets"][0]["rawSql"] for panel in grafana.panels(board)}
    table = filled.stack.query(grafana.query(by_title["Agent versions in the range"], start_ms, end_ms,
                                             {"agent": GRAFANA_ALL}))
    stored = _stored_runs(filled)
    assert {(r["agent_id"], r["agent_version"]): int(r["runs_ended"]) for r in table} == {
        key: int(r["n"]) for key, r in stored.items()}
    series = filled.stack.query(grafana.query(by_title["Runs per agent version"], start_ms, end_ms,
                                              {"agent": GRAFANA_ALL}))
    windows = filled.stack.query("SELECT sum(runs) AS n FROM agent_metrics FINAL")[0]["n"]
    assert sum(int(r["runs_ended"]) for r in series) == int(windows) > 0
    (total,) = filled.stack.query(grafana.query(by_title["Runs"], start_ms, end_ms, {"agent": ["coder"]}))
    assert int(total["runs_ended"]) == sum(int(r["n"]) for key, r in stored.items() if key[0] == "coder")


# --- the notebooks -----------------------------------------------------------------------------------


def notebook_paths() -> list[Path]:
    return sorted(NOTEBOOKS.glob("*.ipynb"))


@pytest.mark.parametrize("path", notebook_paths(), ids=lambda p: p.stem)
def test_notebook_runs_on_the_filled_store(filled: Filled, path: Path):
    """Each notebook runs top to bottom in a python3 kernel of this interpreter and draws its plots,
    here through the running stack's query service (on a stopped data dir the same queries open
    the store directly: test_queries_on_the_stopped_data_dir)."""
    import nbclient
    import nbformat

    # the kernel (this interpreter's, as jupyter_client runs a "python" kernelspec) gets the stack's
    # environment: TRACKSIDE_DATA_DIR of the filled store, PYTHONPATH as given to pytest
    env = {**filled.stack.env, "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")}
    nb = nbformat.read(path, as_version=4)
    started = time.monotonic()
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=120, record_timing=False,
                                     resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute(env=env)
    elapsed = time.monotonic() - started
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code and all(cell.get("execution_count") for cell in code)
    errors = [o for cell in code for o in cell.outputs if o.output_type == "error"]
    assert not errors, errors
    images = [o for cell in code for o in cell.outputs if "image/png" in o.get("data", {})]
    plots = sum(cell.source.count("plt.subplots(") + cell.source.count("plt.figure(") for cell in code)
    assert plots and len(images) >= plots, f"{path.name}: {len(images)} images for {plots} figures"
    text = json.dumps([cell.outputs for cell in code])
    assert str(filled.stack.data_dir) not in text and str(ROOT) not in text, "no absolute paths in the outputs"
    print(f"{path.name}: {elapsed:.1f} s, {len(images)} plots")
    if os.environ.get("TRACKSIDE_SAVE_NOTEBOOKS") == "1":
        nbformat.write(nb, path)


# --- the stopped data dir ------------------------------------------------------------------------------

STOPPED = """
import json, sys
from streams.settings import Settings
from streams.store.clickhouse import query_store
requests = json.load(sys.stdin)
store = query_store(Settings())
print(json.dumps([store.query_json(sql, params) for sql, params in requests], default=str))
"""


def test_queries_on_the_stopped_data_dir(filled: Filled):
    """After `up` stops (and merged its duplicates away), the store opened directly answers alike."""
    names = query_names()
    running = {name: filled.running_results.get(name) or filled.run(name) for name in names}
    assert filled.stack.stop() == 0
    requests = [load_query(name) for name in names]
    result = subprocess.run([sys.executable, "-c", STOPPED], input=json.dumps(requests).encode(),
                            env=filled.stack.env, capture_output=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    stopped = dict(zip(names, json.loads(result.stdout)))
    for name in names:
        assert len(stopped[name]) == len(running[name]), name
        assert stopped[name] == running[name], name


def test_trackside_sql_runs_a_saved_query_with_parameters(filled):
    stack = filled.stack
    result = stack.cli("sql", "--file", "cost_per_success_by_version", "--param", "agent_id=support-bot",
                       "--format", "JSONEachRow")
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert rows and {row["agent_id"] for row in rows} == {"support-bot"}
    bad = stack.cli("sql", "--file", "cost_per_success_by_version", "--param", "bucket_seconds=hourly", check=False)
    assert bad.returncode == 2 and b"is not an integer" in bad.stderr

