"""`trackside gate` (SPEC §11): read both versions' runs in an environment, judge them
(streams/detect/gate.py), write the verdict (a `gates` row, a `gate` alert on failure) and the
reports for CI (Markdown, JUnit XML). How the row is written: streams/ops/README.md, "Gates"."""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape, quoteattr

import orjson

from streams.contracts import tables, topics
from streams.contracts.alerts import FIRING, RESOLVED, fingerprint, make_alert
from streams.detect.gate import GatePolicy, GateResult, judge, margin_in_words, pair_by_task, show, worse_in_words
from streams.errors import TracksideError
from streams.settings import Settings

RUNS_SQL = (
    "SELECT run_id, task_id, agent_version, toString(outcome) AS outcome, toFloat64(cost_usd) AS cost_usd, steps, "
    "toUnixTimestamp64Milli(started_at) AS started_at FROM runs FINAL "
    "WHERE agent_id = {agent:String} AND agent_version IN ({candidate:String}, {baseline:String}) "
    "AND environment = {environment:String} AND task_id != ''")
STABLE_SQL = ("SELECT version FROM deployments FINAL WHERE agent_id = {agent:String} AND role = 'stable' "
              "ORDER BY ts DESC LIMIT 1")
# without deployment events: the version with most runs in the last day of the agent's runs (SPEC §5)
BUSIEST_SQL = (
    "SELECT agent_version AS version, count() AS runs FROM runs FINAL WHERE agent_id = {agent:String} "
    "AND agent_version != {candidate:String} AND ended_at >= (SELECT max(ended_at) FROM runs FINAL "
    "WHERE agent_id = {agent:String}) - INTERVAL 1 DAY GROUP BY agent_version ORDER BY runs DESC, version LIMIT 1")
LAST_ALERT_SQL = ("SELECT alert_id, status FROM alerts FINAL WHERE fingerprint = {fingerprint:String} "
                  "ORDER BY ts DESC, status = 'resolved' DESC LIMIT 1")
LANDED_SQL = "SELECT count() AS n FROM gates FINAL WHERE gate_id = {gate_id:String}"


class GateError(TracksideError):
    pass


@dataclass(frozen=True)
class Gate:
    """One gate run: its verdict and the rows it wrote."""

    result: GateResult
    row: dict
    alert: dict | None
    written_through: str  # "topics" (a running stack lands them) or "store"


def _reader(settings: Settings) -> Any:
    from streams.store.clickhouse import Store, query_store

    store = query_store(settings)
    if isinstance(store, Store) and store.embedded:
        store.migrate()  # a data dir no `up` has run on yet: its tables, so the row has a home
    return store


def _rows(store: Any, sql: str, parameters: dict) -> list[dict]:
    from streams.store.clickhouse import Store

    if isinstance(store, Store):
        return store.query_json(sql, parameters, person=False)
    return store.query_json(sql, parameters)


def find_baseline(store: Any, agent: str, candidate: str) -> tuple[str, str]:
    """(baseline, how it was found): the agent's newest stable deployment, else its busiest version."""
    stable = _rows(store, STABLE_SQL, {"agent": agent})
    if stable and stable[0]["version"] != candidate:
        return stable[0]["version"], "the newest stable deployment"
    busiest = _rows(store, BUSIEST_SQL, {"agent": agent, "candidate": candidate})
    if busiest:
        return busiest[0]["version"], "inferred: the version with most runs in the agent's last day (no stable deployment)"
    raise GateError(f"no baseline for {agent}: no stable deployment and no other version with runs; give --baseline")


def run_gate(settings: Settings, *, agent: str, candidate: str, baseline: str | None = None,
             environment: str = "eval", policy: GatePolicy | None = None, wait_seconds: float = 60.0) -> Gate:
    """Judge the candidate and write its `gates` row (and a `gate` alert on failure); returns
    once the row is in the store."""
    policy = policy or settings.policy().gate(agent)
    store = _reader(settings)
    try:
        found = "given"
        if not baseline:
            baseline, found = find_baseline(store, agent, candidate)
        if baseline == candidate:
            raise GateError(f"the candidate and the baseline are the same version, {candidate}")
        runs = _rows(store, RUNS_SQL, {"agent": agent, "candidate": candidate, "baseline": baseline,
                                       "environment": environment})
        result = judge(pair_by_task([r for r in runs if r["agent_version"] == baseline],
                                    [r for r in runs if r["agent_version"] == candidate]), policy)
        now = time.time_ns() // 1_000_000
        gate_id = uuid.uuid4().hex
        evidence = {**result.evidence(), "gate_id": gate_id, "baseline_from": found,
                    "runs": {"candidate": sum(r["agent_version"] == candidate for r in runs),
                             "baseline": sum(r["agent_version"] == baseline for r in runs)}}
        row = {"gate_id": gate_id, "ts": now, "agent_id": agent, "candidate": candidate, "baseline": baseline,
               "environment": environment, "tasks": result.tasks, "verdict": result.verdict,
               "exit_code": result.exit_code, "reason": result.reason, "evidence": evidence}
        alert = _alert(store, row)
        if _owned_elsewhere(settings, store):
            _send(settings, store, row, alert, wait_seconds)
            through = "topics"
        else:
            store.insert_arrow("gates", tables.to_arrow([{**row, "evidence": orjson.dumps(evidence).decode()}],
                                                        tables.GATES))
            if alert is not None:
                store.insert_arrow("alerts", tables.to_arrow([{**alert, "evidence": orjson.dumps(alert["evidence"]).decode(),
                                                               "action": ""}], tables.ALERTS))
            through = "store"
        return Gate(result, row, alert, through)
    finally:
        store.close()


def _owned_elsewhere(settings: Settings, store: Any) -> bool:
    """Whether a sink owns the store: a running `up` on this data dir (its query service answered),
    or a ClickHouse server, which a deployment's sink writes. Then the row and the alert go
    through the topics, like every other row; else (an embedded store nobody runs) straight in."""
    from streams.store.clickhouse import Store

    return not isinstance(store, Store) or not store.embedded


def _alert(store: Any, row: dict) -> dict | None:
    """A firing `gate` alert for a failed gate; a resolved one for a passing gate whose subject
    (agent, candidate, baseline, environment) is firing now; else none."""
    subject = fingerprint("gate", row["agent_id"], row["candidate"], row["baseline"], row["environment"])
    evidence = {"gate_id": row["gate_id"], "tasks": row["tasks"], "verdict": row["verdict"],
                "metrics": row["evidence"]["metrics"], "alpha": row["evidence"]["alpha"]}
    common = {"kind": "gate", "severity": "warning", "fingerprint": subject, "ts": row["ts"],
              "agent_id": row["agent_id"], "agent_version": row["candidate"], "evidence": evidence}
    if row["verdict"] == "fail":
        return make_alert(status=FIRING, episode=row["gate_id"], **common,
                          summary=f"gate failed: {row['agent_id']} {row['candidate']} vs {row['baseline']} "
                                  f"({row['environment']}): {row['reason']}")
    last = _rows(store, LAST_ALERT_SQL, {"fingerprint": subject})
    if row["verdict"] == "pass" and last and last[0]["status"] == FIRING:
        return make_alert(status=RESOLVED, episode=last[0]["alert_id"], **common,
                          summary=f"cleared: gate passed: {row['agent_id']} {row['candidate']} vs {row['baseline']} "
                                  f"({row['environment']})")
    return None


def _send(settings: Settings, store: Any, row: dict, alert: dict | None, wait_seconds: float) -> None:
    """The row to `trackside.gates` and the alert to `trackside.alerts`; returns once the sink
    has landed the row (SPEC §11: the row is there once the command has exited)."""
    from confluent_kafka import Producer

    failed: list[str] = []
    producer = Producer({**settings.kafka_config, "acks": "all", "client.id": "trackside-gate"})

    def delivered(error: Any, _message: Any) -> None:
        if error is not None:
            failed.append(str(error))

    producer.produce(topics.GATES.name, value=orjson.dumps(row), key=row["agent_id"].encode(), on_delivery=delivered)
    if alert is not None:
        producer.produce(topics.ALERTS.name, value=orjson.dumps(alert), key=alert["fingerprint"].encode(),
                         on_delivery=delivered)
    if producer.flush(30) or failed:
        raise GateError(f"the verdict is not on {topics.GATES.name}: {failed[0] if failed else 'no answer from the broker'}")
    deadline = time.monotonic() + wait_seconds
    delay = 0.05
    while time.monotonic() < deadline:
        if int(_rows(store, LANDED_SQL, {"gate_id": row["gate_id"]})[0]["n"]):
            return
        time.sleep(delay)  # polling the store: the sink gives no other sign that a row landed
        delay = min(delay * 2, 1.0)
    raise GateError(f"the gates row {row['gate_id']} did not land within {wait_seconds:.0f} s: is the sink running?")


# --- reports -----------------------------------------------------------------------------------------

TITLES = {"pass": "passed", "fail": "failed", "insufficient": "not judged: too few paired tasks"}
MARKS = {"pass": "✅", "fail": "❌", "insufficient": "⚠️"}
NAMES = {"success_rate": "success rate", "cost_per_task": "cost per task", "steps": "steps per task"}


def _change(metric: dict) -> str:
    if metric["difference"] is None:
        return "-"
    if metric["metric"] == "success_rate":
        return f"{metric['difference'] * 100:+.1f} points"
    return f"{metric['difference']:+.1%}"


def markdown(gate: Gate) -> str:
    """The gate as a Markdown report: what a CI job summary shows."""
    row, result = gate.row, gate.result
    lines = [
        f"## {MARKS[result.verdict]} Trackside gate {TITLES[result.verdict]}: `{row['agent_id']}` "
        f"`{row['candidate']}` vs `{row['baseline']}`",
        "",
        f"**{result.verdict}** (exit {result.exit_code}) in environment `{row['environment']}`: {result.reason}.",
        "",
        "| metric | baseline | candidate | change | margin | p-value | could be worse by up to | result |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for m in result.metrics:
        verdict = ("**worse**" if m.worse else "within the margin") if m.gating else "reported only"
        if result.verdict == "insufficient":
            verdict = "not judged"
        lines.append(f"| {NAMES[m.metric]} | {show(m.metric, m.baseline)} | {show(m.metric, m.candidate)} | "
                     f"{_change(m.as_dict())} | {margin_in_words(m)} | {m.p_value:.3g} | {worse_in_words(m)} | {verdict} |")
    policy = result.policy
    lines += [
        "",
        f"{result.tasks} paired tasks ({result.pairs} run pairs; minimum {policy.min_tasks}), each metric tested "
        f"one-sided at alpha {policy.alpha:g}. *Could be worse by up to*: the upper confidence bound (level "
        f"{1 - policy.metric_alpha:.3g}) of the degradation, so a pass with a bound near the margin is a strong one.",
        "Success: exact unconditional test of paired runs (the j-th run of a task in each version). Cost and steps: "
        "Wilcoxon signed-rank test of each task's log ratio (candidate / baseline), change = Hodges-Lehmann estimate.",
        f"Baseline: {row['evidence']['baseline_from']}. Gate `{row['gate_id']}` is a row of `gates`"
        f"{'; a `gate` alert went to `trackside.alerts`' if gate.alert is not None and result.verdict == 'fail' else ''}.",
        "",
    ]
    return "\n".join(lines)


def junit(gate: Gate) -> str:
    """The gate as JUnit XML: one test case per metric, failed when shown worse; too few tasks is an error."""
    row, result = gate.row, gate.result
    suite = f"trackside gate {row['agent_id']} {row['candidate']} vs {row['baseline']} ({row['environment']})"
    cases = []
    classname = quoteattr(f"trackside.gate.{row['agent_id']}")
    if result.verdict == "insufficient":
        cases.append(f'    <testcase classname={classname} name="paired_tasks">\n'
                     f'      <error message={quoteattr(result.reason)} type="insufficient"/>\n    </testcase>')
    for m in result.metrics:
        if not m.gating:
            continue
        text = (f"{NAMES[m.metric]}: baseline {show(m.metric, m.baseline)}, candidate {show(m.metric, m.candidate)}, "
                f"change {_change(m.as_dict())}, margin {margin_in_words(m)}, p={m.p_value:.3g} (alpha "
                f"{m.threshold:g}), could be worse by up to {worse_in_words(m)}")
        body = ""
        if result.verdict == "insufficient":
            body = f'\n      <skipped message={quoteattr("too few paired tasks")}/>\n    '
        elif m.worse:
            body = (f'\n      <failure message={quoteattr("shown worse beyond the margin")} type="gate">'
                    f"{escape(text)}</failure>\n    ")
        cases.append(f'    <testcase classname={classname} name="{m.metric}">{body}'
                     f"<system-out>{escape(text)}</system-out></testcase>")
    failures = sum(1 for m in result.metrics if m.gating and m.worse and result.verdict == "fail")
    errors = int(result.verdict == "insufficient")
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<testsuites>\n  <testsuite name={quoteattr(suite)} '
            f'tests="{len(cases)}" failures="{failures}" errors="{errors}">\n' + "\n".join(cases)
            + "\n  </testsuite>\n</testsuites>\n")


def write_reports(gate: Gate, report: str | None, junit_path: str | None) -> None:
    if report:
        Path(report).write_text(markdown(gate), encoding="utf-8")
    if junit_path:
        Path(junit_path).write_text(junit(gate), encoding="utf-8")


def summary_line(gate: Gate) -> str:
    r = gate.result
    bounds = " ".join(f"{m.metric}_worse_up_to={worse_in_words(m).replace(' ', '_')}" for m in r.metrics if m.gating)
    return (f"gate {r.verdict} exit={r.exit_code} agent={gate.row['agent_id']} candidate={gate.row['candidate']} "
            f"baseline={gate.row['baseline']} environment={gate.row['environment']} tasks={r.tasks} {bounds} "
            f"gate_id={gate.row['gate_id']}")


def finite(value: float) -> bool:
    return value is not None and math.isfinite(value)
