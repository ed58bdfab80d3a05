"""`trackside gate` (SPEC §11) and `trackside versions` on the real embedded stack: the 200 real
tau-bench runs split by trial into two versions (pass), the same with a third of the candidate's
successes turned into failures (fail), five tasks alone (exit 2); simulated runs with a costlier
candidate; the `gates` rows, the `gate` alert, the reports; versions from deployments' config."""

import xml.etree.ElementTree as ET
from pathlib import Path

import orjson
import pytest

from jobs.publish import agent_key, publish_lines
from jobs.tau_bench import import_runs
from streams.contracts import topics
from tests.conftest import RunningStack

pytestmark = pytest.mark.integration

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "tau-bench" / "gpt-4o-airline.json"
AGENT = "tau-airline-gpt4o"


def versioned(events: list[dict], version: str, trials: set[int], *, flip_every: int = 0,
              tasks: set[str] | None = None) -> list[dict]:
    """The runs of these trials as runs of `version` in environment eval (new run and event ids);
    with flip_every=3, every third success of the candidate (in task, trial order) ends in failure."""
    runs = sorted({(int(e["task_id"]), e["attributes"]["trial"], e["run_id"]) for e in events
                   if e["type"] == "run_start" and e["attributes"]["trial"] in trials})
    keep = {run_id for task, _, run_id in runs if tasks is None or str(task) in tasks}
    successes = [e["run_id"] for e in events if e["type"] == "run_end" and e["outcome"] == "success"]
    ordered = [run_id for _, _, run_id in runs if run_id in successes and run_id in keep]
    flipped = set(ordered[::flip_every]) if flip_every else set()
    out = []
    for event in events:
        if event["run_id"] not in keep:
            continue
        copy = {**event, "agent_version": version, "environment": "eval", "run_id": f"{version}:{event['run_id']}",
                "event_id": f"{version}:{event['event_id']}"}
        if event["type"] == "run_end" and event["run_id"] in flipped:
            copy.update(outcome="failure", score=0.0)
        out.append(copy)
    return out, len(flipped), len(ordered)


@pytest.fixture(scope="module")
def tau(stack):
    if not DATA.exists():
        pytest.skip(f"{DATA} is not here")
    events = import_runs(DATA)
    baseline, _, _ = versioned(events, "trials-01", {0, 1})
    candidate, _, _ = versioned(events, "trials-23", {2, 3})
    worse, flipped, successes = versioned(events, "trials-23-worse", {2, 3}, flip_every=3)
    five, _, _ = versioned(events, "five-tasks", {2, 3}, tasks={"0", "1", "2", "3", "4"})
    assert (flipped, successes) == (14, 41)  # a third of the candidate's successes
    # in event time, as one stream: an event far older than its partition's watermark would be late
    everything = sorted(baseline + candidate + worse + five, key=lambda e: (e["ts"], e["event_id"]))
    assert publish_lines(stack.settings, [orjson.dumps(e) for e in everything]).rejected == 0
    runs = 100 + 100 + 100 + 10
    assert stack.wait_for_count("SELECT count() FROM runs WHERE environment = 'eval'", runs, timeout=120) == runs
    return stack


def gate(stack, tmp_path, *args):
    report, junit = tmp_path / "gate.md", tmp_path / "gate.xml"
    result = stack.cli("gate", "--agent", AGENT, *args, "--report", str(report), "--junit", str(junit), check=False)
    return result, report.read_text() if report.exists() else "", junit.read_text() if junit.exists() else ""


def gate_row(stack, gate_id):
    (row,) = stack.query("SELECT * FROM gates WHERE gate_id = {id:String}", {"id": gate_id})
    return {**row, "evidence": orjson.loads(row["evidence"])}


def gate_id_of(result) -> str:
    return result.stdout.decode().strip().rsplit("gate_id=", 1)[1]


def test_the_two_halves_of_the_real_runs_pass(tau, tmp_path):
    result, report, junit = gate(tau, tmp_path, "--candidate", "trials-23", "--baseline", "trials-01")
    assert result.returncode == 0, result.stderr.decode()
    row = gate_row(tau, gate_id_of(result))
    assert (row["verdict"], int(row["exit_code"]), int(row["tasks"])) == ("pass", 0, 50)
    assert (row["candidate"], row["baseline"], row["environment"]) == ("trials-23", "trials-01", "eval")
    success = next(m for m in row["evidence"]["metrics"] if m["metric"] == "success_rate")
    assert (success["baseline"], success["candidate"], success["n"]) == (0.43, 0.41, 100)
    assert 0.05 < success["worse_up_to"] < 0.3  # how strong the pass is: up to ~14 points worse
    assert "✅ Trackside gate passed" in report and "could be worse by up to" in report
    assert ET.fromstring(junit).find("testsuite").get("failures") == "0"
    assert not [a for a in tau.query("SELECT * FROM alerts WHERE kind = 'gate'") if a["agent_version"] == "trials-23"]


def test_a_third_of_the_successes_turned_into_failures_fails(tau, tmp_path):
    result, report, junit = gate(tau, tmp_path, "--candidate", "trials-23-worse", "--baseline", "trials-01")
    assert result.returncode == 1, result.stderr.decode()
    gate_id = gate_id_of(result)
    row = gate_row(tau, gate_id)
    assert (row["verdict"], int(row["exit_code"])) == ("fail", 1)
    worse = {m["metric"] for m in row["evidence"]["metrics"] if m["worse"]}
    assert worse == {"success_rate"}
    assert "❌ Trackside gate failed" in report and "**worse**" in report
    failed = [case.get("name") for case in ET.fromstring(junit).iter("testcase") if case.find("failure") is not None]
    assert failed == ["success_rate"]
    # the alert: on the topic (as alerting systems read it) and in the table
    alerts = [a for a in tau.on_topic(topics.ALERTS.name) if a["kind"] == "gate"]
    assert [(a["status"], a["agent_version"], a["evidence"]["gate_id"]) for a in alerts] == [
        ("firing", "trials-23-worse", gate_id)]
    tau.wait_for_count("SELECT count() FROM alerts WHERE kind = 'gate' AND status = 'firing'", 1, timeout=30)


def test_five_tasks_alone_exit_2_with_a_row(tau, tmp_path):
    result, report, junit = gate(tau, tmp_path, "--candidate", "five-tasks", "--baseline", "trials-01")
    assert result.returncode == 2, result.stderr.decode()
    row = gate_row(tau, gate_id_of(result))
    assert (row["verdict"], int(row["exit_code"]), int(row["tasks"])) == ("insufficient", 2, 5)
    assert row["evidence"]["min_tasks"] == 20
    assert "too few paired tasks" in report
    assert ET.fromstring(junit).find("testsuite").get("errors") == "1"


def test_errors_are_exit_3(tau, tmp_path):
    same, _, _ = gate(tau, tmp_path, "--candidate", "trials-01", "--baseline", "trials-01")
    assert same.returncode == 3 and b"same version" in same.stderr
    usage = tau.cli("gate", "--candidate", "x", check=False)  # no --agent: a usage error is not "too few tasks"
    assert usage.returncode == 3 and b"--agent" in usage.stderr


def test_versions_lists_the_gate_verdicts(tau):
    listing = tau.cli("versions", AGENT).stdout.decode()
    lines = {line.split()[0]: line for line in listing.splitlines()[2:]}
    assert {"trials-01", "trials-23", "trials-23-worse", "five-tasks"} <= set(lines)
    assert " fail " in lines["trials-23-worse"] and " insufficient " in lines["five-tasks"]
    (row,) = tau.query("SELECT gate_verdict, first_seen FROM versions WHERE agent_id = {a:String} AND version = "
                       "'trials-23-worse'", {"a": AGENT})
    assert row["gate_verdict"] == "fail" and row["first_seen"].startswith("2026-11-01")


def simulated_runs(version: str, tasks: int, cost: float, seed: int) -> list[dict]:
    """Simple runs of a support agent on tasks T0..: run_start, one llm_call priced as reported, run_end."""
    import random

    rng = random.Random(seed)
    events, t = [], 1_796_000_000_000
    for task in range(tasks):
        for trial in range(2):
            run = f"sim-{version}-{task}-{trial}"
            ok = rng.random() < 0.8
            common = {"run_id": run, "agent_id": "sim-bot", "agent_version": version, "task_id": f"T{task}",
                      "environment": "eval"}
            events += [
                {**common, "event_id": f"{run}:0", "ts": t, "type": "run_start"},
                {**common, "event_id": f"{run}:1", "ts": t + 500, "type": "llm_call", "model": "gpt-4o",
                 "provider": "openai", "input_tokens": 1000, "output_tokens": 100, "status": "ok",
                 "cost_usd": round(cost * rng.uniform(0.01, 0.03), 6)},
                {**common, "event_id": f"{run}:2", "ts": t + 900, "type": "run_end",
                 "outcome": "success" if ok else "failure"},
            ]
            t += 1000
    return events


def test_simulated_costlier_candidate_fails_on_cost_and_a_deployment_config_makes_a_version(tau, tmp_path):
    config = {"model": "gpt-4o", "provider": "openai", "prompt_sha": "a1", "tools": ["search", "refund"],
              "params": {"temperature": 0.2}}
    deployments = [
        {"agent_id": "sim-bot", "version": "v1", "role": "stable", "traffic_pct": 100, "ts": 1_796_000_000_000,
         "config": config},
        {"agent_id": "sim-bot", "version": "v2", "role": "canary", "traffic_pct": 0, "ts": 1_796_000_000_001,
         "config": {**config, "model": "gpt-4o-mini", "tools": ["search", "email"]}},
        # v2 deployed again under the same name with another prompt: flagged
        {"agent_id": "sim-bot", "version": "v2", "role": "canary", "traffic_pct": 0, "ts": 1_796_000_000_002,
         "config": {**config, "model": "gpt-4o-mini", "tools": ["search", "email"], "prompt_sha": "b2"}},
    ]
    assert publish_lines(tau.settings, [orjson.dumps(d) for d in deployments], topic=topics.AGENT_DEPLOYMENTS.name,
                         key=agent_key).produced == 3
    events = simulated_runs("v1", 30, 1.0, 1) + simulated_runs("v2", 30, 1.6, 1)
    assert publish_lines(tau.settings, [orjson.dumps(e) for e in events]).rejected == 0
    tau.wait_for_count("SELECT count() FROM runs WHERE agent_id = 'sim-bot'", 120, timeout=60)
    result = tau.cli("gate", "--agent", "sim-bot", "--candidate", "v2", check=False)  # baseline: the stable one
    assert result.returncode == 1, result.stderr.decode()
    row = gate_row(tau, gate_id_of(result))
    assert row["baseline"] == "v1" and row["evidence"]["baseline_from"] == "the newest stable deployment"
    assert {m["metric"] for m in row["evidence"]["metrics"] if m["worse"]} == {"cost_per_task"}
    (v2,) = tau.query("SELECT config, configs, config_changed, roles, gate_verdict FROM versions "
                      "WHERE agent_id = 'sim-bot' AND version = 'v2'")
    assert orjson.loads(v2["config"])["prompt_sha"] == "a1" and len(v2["configs"]) == 2 and v2["config_changed"]
    assert v2["roles"] == ["canary"] and v2["gate_verdict"] == "fail"
    diff = tau.cli("versions", "sim-bot", "--diff", "v1", "v2").stdout.decode()
    assert "model" in diff and "gpt-4o-mini" in diff and "tools added" in diff and "email" in diff
    assert "tools removed" in diff and "refund" in diff and "changed under the same name" in diff
    assert "success_rate" in diff and "cost_per_success" in diff and "tool" in diff
    listing = tau.cli("versions", "sim-bot").stdout.decode()
    assert "CHANGED under the same name" in listing


def test_without_a_running_stack_the_row_goes_straight_into_the_store(tmp_path):
    quiet = RunningStack(tmp_path / "no-up")  # never started: the CLI opens the embedded store itself
    quiet.data_dir.mkdir()
    result = quiet.cli("gate", "--agent", "nobody", "--candidate", "v2", "--baseline", "v1", check=False)
    assert result.returncode == 2, result.stderr.decode()
    gate_id = gate_id_of(result)
    rows = orjson.loads(quiet.cli("sql", f"SELECT verdict, tasks FROM gates WHERE gate_id = '{gate_id}'",
                                  "--format", "JSON").stdout)["data"]
    assert rows == [{"verdict": "insufficient", "tasks": 0}]
    missing = quiet.cli("gate", "--agent", "nobody", "--candidate", "v2", check=False)
    assert missing.returncode == 3 and b"no baseline" in missing.stderr
