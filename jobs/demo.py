"""`trackside demo`: start the embedded stack, play a simulated fleet, print what Trackside found."""

from __future__ import annotations

import random
import shutil
import time

import orjson
from rich.console import Console
from rich.table import Table

from jobs.example_agent import handle
from jobs.publish import agent_key, publish_lines
from streams.client import Trackside, VersionPaused
from streams.contracts import topics
from jobs.simulate import (DEFAULT_CANARY, DEFAULT_START_MS, HOUR_MS, FleetConfig, genai_prices_fn, run_labels,
                           simulate)
from streams.ops.broker import port_free
from streams.ops.gates import Gate, run_gate
from streams.detect.gate import margin_in_words, show, worse_in_words
from streams.settings import Settings
from streams.ops.stack import Stack

DEMO_SPAN_MS = 3 * 3_600_000  # the fleet starts on the hour, two to three hours ago

# A few of the ways real producers get it wrong; each must end in the dead letters.
MALFORMED = (
    b"this is not json",
    b'{"event_id": "x1", "ts": "yesterday", "type": "llm_call", "run_id": "r", "agent_id": "support-bot", "agent_version": "v1.4.2"}',
    b'{"event_id": "x2", "ts": 1793491200000, "type": "teleport", "run_id": "r", "agent_id": "support-bot", "agent_version": "v1.4.2"}',
    b'{"event_id": "x3", "ts": 1793491200000, "type": "llm_call", "run_id": "r", "agent_id": "coder", "agent_version": "0.9.3", "input_tokens": -5}',
    b'["an", "array"]',
)

# the fleet's traffic: the evaluation runs of the gate act are told apart (environment `eval`)
SUMMARY = """
SELECT agent_id, agent_version, count() AS runs, countIf(outcome = 'success') AS successes,
       sum(cost_usd) AS cost, sum(cost_usd) / nullIf(countIf(outcome = 'success'), 0) AS cost_per_success,
       quantile(0.95)(duration_ms) AS p95_duration_ms, countIf(outcome = 'timeout') AS timeouts,
       countIf(loop_detected) AS loops
FROM runs WHERE environment != 'eval' GROUP BY agent_id, agent_version ORDER BY agent_id, agent_version
"""
ALERTS = """
SELECT kind, countIf(status = 'firing') AS firing, countIf(status = 'resolved') AS resolved,
       argMax(summary, ts) AS latest
FROM alerts GROUP BY kind ORDER BY kind
"""
CANARIES = """
SELECT agent_id, version, stable_version, since, inferred, decision, decided_at, canary_runs, stable_runs, reason,
       evidence
FROM canaries ORDER BY agent_id, version
"""
ROLLBACKS = "SELECT agent_id, from_version, to_version, ts, length(alert_ids) FROM rollbacks"
# a failure mode spans agents: its runs per agent from its breakdown
CLUSTERS = """
SELECT c.size, c.label, arrayStringConcat(arrayMap(x -> concat(x.1, ' ', toString(x.2)),
       arrayReverseSort(x -> x.2, b.agents)), ', ')
FROM failure_clusters AS c FINAL
LEFT JOIN (SELECT cluster_id, groupArray((toString(agent_id), runs)) AS agents
           FROM (SELECT cluster_id, agent_id, sum(runs) AS runs FROM failure_cluster_agents FINAL
                 GROUP BY cluster_id, agent_id) GROUP BY cluster_id) AS b ON b.cluster_id = c.cluster_id
ORDER BY c.size DESC, c.cluster_id LIMIT 6
"""
DEAD_BY_AGENT = """
SELECT JSONExtractString(toString(payload), 'agent_id') AS agent_id,
       JSONExtractString(toString(payload), 'agent_version') AS agent_version, count()
FROM dead_letters GROUP BY agent_id, agent_version
"""


# The gate act: before its canary, each release candidate of support-bot runs the same eval suite as
# the stable version (EVAL_TASKS tasks x EVAL_TRIALS trials, environment `eval`), and `trackside
# gate` judges it. Per candidate: the share of each task's success it keeps on the suite, and why.
EVAL_TASKS, EVAL_TRIALS = 30, 2
EVAL_BASELINE = "v1.4.2"
EVAL_CANDIDATES = (
    ("v1.6.0-rc0", 0.55, "a tool-schema change broke its order lookups"),
    # the demo's canary: as good as stable on the suite; its regression shows on real traffic only
    (DEFAULT_CANARY.version, 1.0, "the fix of rc0; its new prompt is what real traffic will try"),
)
EVAL_SPACING_MS = 4_000  # one eval run starts every 4 s (12 minutes of event time in all)
# The suite ran this long before the fleet's two hours (CI, that morning). More than the drift
# tests' reference age (3 h, streams/detect/drift.py): the metrics stage does not tell eval runs
# from traffic, and the stable version's eval runs, shorter than its real ones, would otherwise be
# part of its drift reference.
EVAL_BEFORE_MS = 4 * HOUR_MS


def eval_events(start_ms: int, seed: int = 8) -> list[dict]:
    """support-bot's runs of the eval suite, by the stable version and each candidate, in event
    time from `start_ms`. A task has its own chance of success (mostly solved, a few hard ones,
    as on a support suite), its own length (order lookups) and prompt; a run succeeds with the
    task's chance times what its version keeps; a failed run's lookup finds no order. With the
    default seed, rc1 succeeds exactly as often as the stable version on the suite (the draws are
    independent per version: another seed gives rc1 anywhere from -15 to +10 points)."""
    rng = random.Random(seed)
    tasks = [(rng.betavariate(4.0, 1.0), rng.randint(1, 3), rng.randint(1100, 1800)) for _ in range(EVAL_TASKS)]
    versions = ((EVAL_BASELINE, 1.0),) + tuple((version, keep) for version, keep, _ in EVAL_CANDIDATES)
    events, t = [], start_ms
    for trial in range(EVAL_TRIALS):
        for task, (chance, lookups, prompt) in enumerate(tasks):
            for version, keep in versions:
                run_id = f"eval-{version}-{task:02d}-{trial}"
                ok = rng.random() < chance * keep
                common = {"run_id": run_id, "agent_id": "support-bot", "agent_version": version,
                          "task_id": f"EVAL-{task:03d}", "environment": "eval"}
                order = 70_000 + 37 * task
                steps = [{"type": "llm_call", "model": "gpt-4o-mini", "provider": "openai",
                          "input_tokens": prompt + rng.randint(0, 200), "output_tokens": rng.randint(60, 120),
                          "status": "ok"}]
                for k in range(lookups):
                    found = ok or k < lookups - 1
                    steps.append({"type": "tool_call", "tool": "lookup_order", "args": {"order_id": str(order + k)},
                                  "status": "ok" if found else "error",
                                  **({} if found else {"error_type": "not_found",
                                                       "error_message": f"order #{order + k} not found"})})
                steps.append({"type": "llm_call", "model": "gpt-4o-mini", "provider": "openai",
                              "input_tokens": prompt + 400 + rng.randint(0, 200),
                              "output_tokens": rng.randint(150, 210), "status": "ok"})
                end = {"type": "run_end", "outcome": "success" if ok else "failure"}
                if not ok:
                    end.update(error_type="not_found", error_message=f"order #{order + lookups - 1} not found")
                for n, event in enumerate([{"type": "run_start"}, *steps, end]):
                    events.append({**common, **event, "event_id": f"{run_id}:{n}", "ts": t + 500 * n})
                t += EVAL_SPACING_MS
    return events


def demo_deployments(config: FleetConfig) -> list[dict]:
    """What deploy tooling would have said: support-bot's stable versions, then its canary at
    the share and time the simulator starts it. Other agents send none: their roles are inferred."""
    canary = config.canary
    since = canary.start_ms if canary.start_ms is not None else config.start_ms + config.duration_ms // 2
    return [
        {"agent_id": "support-bot", "version": "v1.5.0", "role": "stable", "traffic_pct": 20,
         "ts": config.start_ms - 2 * 86_400_000},
        {"agent_id": "support-bot", "version": "v1.4.2", "role": "stable", "traffic_pct": 80,
         "ts": config.start_ms - 86_400_000},
        {"agent_id": canary.agent_id, "version": canary.version, "role": "canary",
         "traffic_pct": round(100 * canary.share), "ts": since},
    ]


def demo_settings(settings: Settings) -> Settings:
    """The demo's own data dir (reset each time) and a free port, so it never meets a running stack."""
    data_dir = settings.data_dir / "demo"
    shutil.rmtree(data_dir, ignore_errors=True)
    port = settings.embedded_port
    while not port_free(port):
        port += 1
    return settings.model_copy(update={"data_dir": data_dir, "embedded_port": port})


def run_demo(settings: Settings, *, runs: int = 600, seed: int = 7, tau_bench: str | None = None,
             serve_s: float = 0.0) -> int:
    console = Console(width=None if Console().is_terminal else 110)
    settings = demo_settings(settings) if settings.embedded else settings
    # the fleet's two hours end about now, so the console's default range (the 24 h that end with
    # the newest run) holds them and the live agent's runs that follow
    start_ms = (time.time_ns() // 1_000_000 - DEMO_SPAN_MS) // HOUR_MS * HOUR_MS
    config = FleetConfig(seed=seed, runs=runs, canary=DEFAULT_CANARY, price_fn=genai_prices_fn, start_ms=start_ms)
    fleet = list(simulate(config))
    expected_runs = len(run_labels(config))
    recorded = ""
    if tau_bench:
        from jobs.tau_bench import import_runs

        real = import_runs(tau_bench)
        for event in real:  # recorded from DEFAULT_START_MS on: to the fleet's start
            event["ts"] += start_ms - DEFAULT_START_MS
        real_runs = len({event["run_id"] for event in real})
        # both start at the same event time: merged by it, as live traffic would arrive
        fleet = sorted(fleet + real, key=lambda event: event["ts"])
        expected_runs += real_runs
        recorded = f" (with {real_runs} recorded tau-bench runs)"
    events = [orjson.dumps(event) for event in fleet]
    deployments = demo_deployments(config)
    # the canary is deployed only once its candidate has passed the gate; the eval suite ran before
    # the fleet's two hours (published first: nothing later in event time is on the topic yet)
    stables = [d for d in deployments if d["role"] == "stable"]
    canaries = [d for d in deployments if d["role"] != "stable"]
    evaluation = eval_events(start_ms - EVAL_BEFORE_MS)
    eval_runs = len({event["run_id"] for event in evaluation})
    lines = events[: len(events) // 2] + list(MALFORMED) + events[len(events) // 2:] + events[:50]

    started = time.monotonic()
    with console.status("starting the embedded stack (broker, store, processors)"):
        stack = Stack(settings)
        stack.start()
    try:
        console.print(stack.ready_line)
        publish_lines(settings, [orjson.dumps(d) for d in stables], topic=topics.AGENT_DEPLOYMENTS.name,
                      key=agent_key)
        with console.status("the gate: the release candidates' eval runs, then `trackside gate` on each"):
            publish_lines(settings, [orjson.dumps(event) for event in evaluation])
            _wait_for_runs(stack, eval_runs, timeout=60, environment="eval")
            _wait_for(stack, "SELECT count() FROM deployments", len(stables), timeout=30)  # the gate's baseline
            gates = [run_gate(settings, agent="support-bot", candidate=version, environment="eval")
                     for version, _, _ in EVAL_CANDIDATES]
        passed = {gate.row["candidate"] for gate in gates if gate.result.verdict == "pass"}
        rolled_out = [d for d in canaries if d["version"] in passed]
        _print_gates(console, gates, rolled_out)
        publish_lines(settings, [orjson.dumps(d) for d in rolled_out], topic=topics.AGENT_DEPLOYMENTS.name,
                      key=agent_key)
        report = publish_lines(settings, lines)
        console.print(
            f"published {report.produced} messages: {len(events)} events of {expected_runs} runs{recorded}, "
            f"{len(MALFORMED)} malformed, 50 redelivered duplicates; {len(stables) + len(rolled_out)} deployment "
            f"events (and {len(evaluation)} events of {eval_runs} eval runs before)"
        )
        with console.status("waiting for every run to land in ClickHouse"):
            landed = _wait_for_runs(stack, expected_runs, timeout=120)
        with console.status("waiting for the last verdicts, alerts and drift tests"):
            _settle(stack)
        _print_summary(console, stack)
        with console.status("closing the loop: a live agent on the client, the paused canary"):
            lines = _close_the_loop(stack, settings)
        _print_controls(console, stack, lines)
        console.print(
            f"{landed} of {expected_runs} runs landed; whole demo took {time.monotonic() - started:.1f} s"
        )
        if stack.console is not None:
            console.print(f"console: {stack.console.url}" + (f" (serving for {serve_s:.0f} s; Ctrl-C ends it)"
                                                              if serve_s else " (pass --serve to keep it up)"))
        if serve_s:
            _serve(serve_s)
        return 0 if landed == expected_runs else 1
    finally:
        with console.status("stopping"):
            stack.stop()


def _serve(seconds: float) -> None:
    """Keep the stack up for `seconds`, or until Ctrl-C (or SIGTERM)."""
    import signal
    import threading

    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    stop.wait(seconds)


def _wait_for_runs(stack: Stack, expected: int, timeout: float, *, environment: str = "") -> int:
    """Runs landed, the eval suite's (`environment="eval"`) or the fleet's (every other), once
    `expected` have or the time is up."""
    deadline = time.monotonic() + timeout
    landed = 0
    sql = "SELECT count() FROM runs WHERE (environment = 'eval') = {eval:Bool}"
    while time.monotonic() < deadline:
        landed = stack.store.query_rows(sql, {"eval": environment == "eval"})[0][0]
        if landed >= expected:
            break
        time.sleep(0.5)
    return landed


def _wait_for(stack: Stack, sql: str, expected: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and stack.store.query_rows(sql)[0][0] < expected:
        time.sleep(0.1)


SETTLED = """
SELECT (SELECT count() FROM alerts), (SELECT count() FROM rollbacks), (SELECT count() FROM canaries),
       (SELECT count() FROM drift), (SELECT count() FROM agent_metrics),
       (SELECT count() FROM canaries FINAL WHERE decision = 'rollback' AND role != 'shadow')
         > (SELECT uniqExact(agent_id, from_version) FROM rollbacks) AS rollback_in_flight
"""


def _settle(stack: Stack, quiet: float = 3.0, timeout: float = 60.0) -> None:
    """Wait until the processors' outputs stop changing for `quiet` seconds: the last runs
    are in, but the verdicts and alerts they trigger land a moment later."""
    deadline = time.monotonic() + timeout
    last, since = None, time.monotonic()
    while time.monotonic() < deadline:
        now = stack.store.query_rows(SETTLED)[0]
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet and not now[-1]:  # a decided rollback is on its way
            return
        time.sleep(0.25)


def _print_gates(console: Console, gates: list[Gate], rolled_out: list[dict]) -> None:
    """Each candidate's gate: its verdict and what follows, and the tests behind them."""
    tasks = gates[0].result.tasks if gates else 0
    console.print(f"[bold]Evaluation gate[/bold] (trackside gate: each release candidate against the stable "
                  f"version on the same {tasks} eval tasks x {EVAL_TRIALS} trials, before any traffic)")
    why = {version: said for version, _, said in EVAL_CANDIDATES}
    deployed = {d["version"]: d for d in rolled_out}
    table = Table(title="the gates (rows of `gates`; paired by task, one-sided tests at the policy's alpha)")
    for column in ("candidate", "metric", "baseline", "candidate ", "change", "margin", "p-value",
                   "could be worse by up to", "result"):
        table.add_column(column, justify="left" if column in ("candidate", "metric", "result") else "right")
    for gate in gates:
        row, result = gate.row, gate.result
        head = f"  {row['agent_id']} {row['candidate']} vs {row['baseline']} ({why.get(row['candidate'], '')}): "
        if result.verdict == "pass" and row["candidate"] in deployed:
            d = deployed[row["candidate"]]
            console.print(head + f"[bold green]PASSED[/bold green] (exit 0): rolled out as a {d['traffic_pct']:g}% "
                                 f"{d['role']}, judged on real traffic below. {result.reason}")
        elif result.verdict == "fail":
            console.print(head + f"[bold red]STOPPED AT THE GATE[/bold red] (exit 1): never deployed. {result.reason}")
        else:
            console.print(head + f"{result.verdict} (exit {result.exit_code}): {result.reason}")
        for m in result.metrics:
            change = (f"{m.difference * 100:+.1f} pt" if m.metric == "success_rate" else f"{m.difference:+.0%}")
            table.add_row(row["candidate"], m.metric, show(m.metric, m.baseline), show(m.metric, m.candidate), change,
                          margin_in_words(m), f"{m.p_value:.2g}", worse_in_words(m),
                          "WORSE" if m.worse and m.gating else "ok" if m.gating else "reported")
    console.print(table)


def _print_summary(console: Console, stack: Stack) -> None:
    dead = {(agent, version): count for agent, version, count in stack.store.query_rows(DEAD_BY_AGENT)}
    table = Table(title="Trackside: per agent and version (read back from ClickHouse)")
    columns = ("agent", "version", "runs", "success rate", "cost / successful task", "p95 duration", "timeouts",
               "loops", "dead letters")
    for column in columns:
        table.add_column(column, justify="left" if column in ("agent", "version") else "right")
    for agent, version, runs, successes, _cost, per_success, p95, timeouts, loops in stack.store.query_rows(SUMMARY):
        table.add_row(
            agent, version, str(runs), f"{successes / runs:.1%}",
            "-" if per_success is None else f"${per_success:.4f}", f"{p95 / 1000:.1f} s", str(timeouts),
            str(loops), str(dead.pop((agent, version), 0)),
        )
    table.add_row("(no agent)", *[""] * (len(columns) - 2), str(sum(dead.values())))
    console.print(table)

    alerts = Table(title="Alerts sent on trackside.alerts")
    for column in ("kind", "firing", "resolved", "latest"):
        alerts.add_column(column, justify="right" if column in ("firing", "resolved") else "left")
    for kind, firing, resolved, latest in stack.store.query_rows(ALERTS):
        alerts.add_row(kind, str(firing), str(resolved), latest)
    console.print(alerts)

    _print_rollouts(console, stack)

    clusters = Table(title="Largest failure clusters (failure modes across the fleet)")
    for column in ("runs", "failure mode", "runs per agent"):
        clusters.add_column(column, justify="right" if column == "runs" else "left")
    for size, label, agents in stack.store.query_rows(CLUSTERS):
        clusters.add_row(str(size), label, agents)
    console.print(clusters)


def _print_rollouts(console: Console, stack: Stack) -> None:
    """Each canary's verdict; a rollback told as a story, with the evidence behind it."""
    rollbacks = {(agent, version): (to, ts, alerts) for agent, version, to, ts, alerts in
                 stack.store.query_rows(ROLLBACKS)}
    console.print("[bold]Canaries[/bold] (sequential test against the stable version; rollbacks on trackside.rollbacks)")
    for (agent, version, stable, since, inferred, decision, decided_at, canary_runs, stable_runs, reason,
         evidence) in stack.store.query_rows(CANARIES):
        roles = "roles inferred from traffic" if inferred else "roles from agent.deployments"
        head = f"  {agent} {version} vs {stable} ({roles}, canary since {since:%H:%M:%S}): "
        sent = rollbacks.get((agent, version))
        if decision != "rollback" or sent is None:
            console.print(head + f"{decision} after {canary_runs} canary runs. {reason}")
            continue
        to, ts, alerts = sent
        console.print(head + f"[bold red]ROLLED BACK[/bold red] to {to} at {ts:%H:%M:%S} event time, after "
                      f"{canary_runs} canary runs ({stable_runs} stable runs meanwhile), with {alerts} alert(s): {reason}")
        table = Table(title=f"evidence of the {agent} {version} rollback")
        for column in ("metric", stable, version, "n stable", "n canary", "margin", "z", "always-valid p", "alpha",
                       "worse"):
            table.add_column(column, justify="left" if column == "metric" else "right")
        for m in orjson.loads(evidence)["metrics"]:
            table.add_row(m["metric"], _num(m["stable"]), _num(m["canary"]), str(m["n_stable"]), str(m["n_canary"]),
                          _num(m["margin"]), _num(m["statistic"]), _num(m["p_value"]), _num(m["threshold"]),
                          "yes" if m["worse"] else "")
        console.print(table)


LIVE_AGENT = "example-agent"
CONTROLS = """
SELECT action, issued_by, count() AS controls,
       argMax(if(action = 'stop_run', substring(run_id, 1, 8), agent_id || ' ' || agent_version), ts) AS newest,
       argMax(reason, ts) AS why
FROM controls FINAL GROUP BY action, issued_by ORDER BY action, issued_by
"""


def _close_the_loop(stack: Stack, settings: Settings) -> list[str]:
    """Intervene, as agents do when Trackside tells them: a live agent written with the client
    (jobs/example_agent.py) answers three tickets, the third looping, which its client stops at
    the next step; and a client of each rolled-back canary version is refused a new run."""
    lines = []
    agent = Trackside(settings.bootstrap_servers, LIVE_AGENT, "v1")
    try:
        for ticket in (1, 2, 3):
            # a step of 0.3 s: a quick model call; the stop comes ~0.25 s after the looping call
            run_id, ended, steps = handle(agent, ticket, looping=ticket == 3, step_s=0.3)
            ended = ended.replace(f"run {run_id} of {LIVE_AGENT} v1 ", "")
            lines.append(f"live agent {LIVE_AGENT}, ticket {ticket}: run {run_id[:8]} ended after {steps} steps: {ended}")
    finally:
        agent.close()
    for agent_id, version in stack.store.query_rows("SELECT DISTINCT agent_id, from_version FROM rollbacks FINAL"):
        canary = Trackside(settings.bootstrap_servers, agent_id, version)
        try:
            canary.start_run(wait_s=10).end("aborted")
            lines.append(f"{agent_id} {version}: rolled back but not paused (its policy says pause_on_rollback = false)")
        except VersionPaused as paused:
            lines.append(f"{agent_id} {version}: a new run is refused by its client, VersionPaused: {paused.reason}")
        finally:
            canary.close()
    # the live agent's stop lands in `controls` a moment after the agent obeyed it
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not stack.store.query_rows(
            "SELECT count() FROM controls WHERE action = 'stop_run' AND agent_id = {agent:String}",
            {"agent": LIVE_AGENT})[0][0]:
        time.sleep(0.2)
    return lines


def _print_controls(console: Console, stack: Stack, lines: list[str]) -> None:
    console.print("[bold]The loop closed[/bold] (controls on trackside.controls, obeyed by the agent client)")
    for line in lines:
        console.print("  " + line)
    table = Table(title="Controls (the audit trail, read back from ClickHouse)")
    for column in ("action", "issued by", "controls", "the newest: subject", "reason"):
        table.add_column(column, justify="right" if column == "controls" else "left",
                         no_wrap=column != "reason", max_width=60 if column == "reason" else None)
    for action, issued_by, count, newest, why in stack.store.query_rows(CONTROLS):
        table.add_row(action, issued_by, str(count), newest, why[:110])
    console.print(table)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"
