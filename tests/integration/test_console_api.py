"""The console's JSON API (SPEC §10) on the demo's fleet, on the real embedded stack: what each
endpoint returns, the live runs as events arrive, the Stop endpoint and the token rules."""

import time

import orjson
import pytest
from confluent_kafka import Producer

from jobs.demo import demo_deployments
from jobs.publish import agent_key, publish_lines
from jobs.simulate import DEFAULT_CANARY, FleetConfig, genai_prices_fn, run_labels, simulate, truth
from streams.contracts import topics
from tests.conftest import RunningStack
from tests.waiting import wait_until

pytestmark = pytest.mark.integration

FLEET_FIELDS = {"agent_id", "agent_version", "role", "runs", "success_rate", "cost_per_success", "p95_duration_ms",
                "loop_rate", "tool_error_rate", "state"}
LIVE_FIELDS = {"run_id", "agent_id", "agent_version", "started_at", "steps", "cost_usd", "last_tool", "loop_suspected"}
ALERT_FIELDS = {"alert_id", "ts", "kind", "severity", "status", "fingerprint", "agent_id", "agent_version", "run_id",
                "summary", "evidence"}
JSON_BODY = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    stack = RunningStack(tmp_path_factory.mktemp("console"))
    stack.start()
    try:
        config = FleetConfig(seed=7, runs=600, canary=DEFAULT_CANARY, price_fn=genai_prices_fn)  # the demo's
        report = publish_lines(stack.settings, [orjson.dumps(d) for d in demo_deployments(config)],
                               topic=topics.AGENT_DEPLOYMENTS.name, key=agent_key)
        assert report.produced == 3
        events = list(simulate(config))
        assert publish_lines(stack.settings, [orjson.dumps(event) for event in events]).rejected == 0
        runs = len(run_labels(config))
        assert stack.wait_for_count("SELECT count() FROM runs", runs, timeout=120) == runs
        assert stack.wait_for_count("SELECT count() FROM rollbacks", 1, timeout=60) == 1
        stack.wait_until_processed()
        yield stack, truth(events, genai_prices_fn, run_labels(config)), events
    finally:
        assert stack.stop() == 0


def test_healthz_and_fleet(demo):
    stack, expected, _ = demo
    status, health = stack.api("/healthz")
    assert status == 200 and health["ok"] is True
    status, fleet = stack.api("/api/v1/fleet?hours=1000")
    assert status == 200 and {tuple(sorted(row)) for row in fleet} == {tuple(sorted(FLEET_FIELDS))}
    assert {(row["agent_id"], row["agent_version"]): row["runs"] for row in fleet} == {
        key: group["runs"] for key, group in expected["groups"].items()}
    assert [row["runs"] for row in fleet] == sorted((row["runs"] for row in fleet), reverse=True), "largest first"
    by_version = {(row["agent_id"], row["agent_version"]): row for row in fleet}
    for key, group in expected["groups"].items():
        assert by_version[key]["success_rate"] == pytest.approx(group["success_rate"])
        if group["cost_per_success"] is not None:
            assert by_version[key]["cost_per_success"] == pytest.approx(group["cost_per_success"], rel=1e-6)
    canary = by_version[("support-bot", DEFAULT_CANARY.version)]
    assert (canary["role"], canary["state"]) == ("canary", "rolled_back")
    assert by_version[("support-bot", "v1.4.2")]["role"] == "stable"
    assert {row["state"] for row in fleet} <= {"healthy", "drifting", "canary", "rolled_back", "paused"}
    # the default range is the 24 hours that end with the newest run: the whole 2-hour fleet
    assert stack.api("/api/v1/fleet")[1] == fleet


def test_alerts_newest_first_and_firing_now(demo):
    stack, _, _ = demo
    status, alerts = stack.api("/api/v1/alerts")
    assert status == 200 and alerts and all(ALERT_FIELDS <= set(alert) for alert in alerts)
    assert [a["ts"] for a in alerts] == sorted((a["ts"] for a in alerts), reverse=True)
    assert {a["alert_id"] for a in alerts} == {row["alert_id"] for row in stack.query("SELECT alert_id FROM alerts")}
    newest = {}
    for alert in sorted(alerts, key=lambda a: a["ts"]):
        newest[alert["fingerprint"]] = alert
    firing = stack.api("/api/v1/alerts?status=firing")[1]
    assert {a["alert_id"] for a in firing} == {a["alert_id"] for a in newest.values() if a["status"] == "firing"}
    assert firing and all(a["status"] == "firing" for a in firing)
    loops = stack.api("/api/v1/alerts?kind=loop&limit=3")[1]
    assert len(loops) == 3 and {a["kind"] for a in loops} == {"loop"} and isinstance(loops[0]["evidence"], dict)
    assert stack.api("/api/v1/alerts?status=sleeping")[0] == 400


def test_canaries(demo):
    stack, _, _ = demo
    status, canaries = stack.api("/api/v1/canaries")
    assert status == 200 and canaries
    status, one = stack.api(f"/api/v1/canaries/support-bot/{DEFAULT_CANARY.version}")
    assert status == 200 and one["verdict"] == "rollback" and one["canary_runs"] >= 20
    assert one in canaries and {m["metric"] for m in one["evidence"]["metrics"]} >= {"success_rate", "cost_per_success"}
    assert stack.api("/api/v1/canaries/support-bot/v0-nothing")[0] == 404


def test_a_run_with_its_events_in_event_time_order(demo):
    stack, expected, events = demo
    run_id = next(run_id for run_id, run in expected["runs"].items() if run["outcome"] == "success")
    status, run = stack.api(f"/api/v1/runs/{run_id}")
    assert status == 200 and run["run_id"] == run_id and run["open"] is False
    assert (run["outcome"], run["steps"]) == ("success", expected["runs"][run_id]["steps"])
    assert [e["ts"] for e in run["events"]] == sorted(e["ts"] for e in run["events"])
    assert sorted(e["event_id"] for e in run["events"]) == sorted({e["event_id"] for e in events if e["run_id"] == run_id})
    assert stack.api("/api/v1/runs/no-such-run")[0] == 404


def test_a_run_is_live_while_it_runs_and_can_be_stopped(demo):
    stack, _, _ = demo
    wait_until(lambda: stack.api("/healthz")[1], 30, "the live view to follow the topics",
               done=lambda health: health["live"])
    now = time.time_ns() // 1_000_000
    producer = Producer({"bootstrap.servers": f"127.0.0.1:{stack.port}"})

    def send(n: int, kind: str, **fields) -> None:
        event = {"event_id": f"live-{n}", "ts": now + n, "type": kind, "run_id": "live-run", "agent_id": "live-bot",
                 "agent_version": "v1", **fields}
        producer.produce("agent.events", value=orjson.dumps(event), key=b"live-run")
        assert producer.flush(10) == 0

    send(0, "run_start")
    send(1, "llm_call", model="gpt-4o-mini", provider="openai", input_tokens=1000, output_tokens=50)
    send(2, "tool_call", tool="search", args={"q": "<script>alert(1)</script>"})
    live = wait_until(lambda: stack.api("/api/v1/runs/live")[1], 30, "the run in the live view",
                      done=lambda runs: any(r["run_id"] == "live-run" and r["steps"] == 2 for r in runs))
    (run,) = [r for r in live if r["run_id"] == "live-run"]
    assert LIVE_FIELDS <= set(run) and (run["last_tool"], run["loop_suspected"]) == ("search", False)
    assert run["cost_usd"] > 0 and run["started_at"] == now
    status, assembled = stack.api("/api/v1/runs/live-run")
    assert status == 200 and assembled["open"] is True

    # Stop: JSON with a reason, else refused
    assert stack.api("/api/v1/runs/live-run/stop", method="POST", body=b"reason=x")[0] == 415
    assert stack.api("/api/v1/runs/live-run/stop", method="POST", body=b"{}", headers=JSON_BODY)[0] == 400
    assert stack.api("/api/v1/runs/live-run/stop", method="POST", body=b'{"reason": "x"}',
                     headers={**JSON_BODY, "Origin": "http://evil.example"})[0] == 403
    status, control = stack.api("/api/v1/runs/live-run/stop", method="POST", body=b'{"reason": "on call: runaway"}',
                                headers=JSON_BODY)
    assert status == 201 and (control["action"], control["run_id"], control["reason"]) == (
        "stop_run", "live-run", "on call: runaway")
    assert control["issued_by"].startswith("console:")
    assert control in stack.on_topic("trackside.controls")
    assert stack.wait_for_count("SELECT count() FROM controls WHERE run_id = 'live-run'", 1) == 1

    send(3, "run_end", outcome="aborted")
    wait_until(lambda: stack.api("/api/v1/runs/live")[1], 30, "the run to leave the live view",
               done=lambda runs: all(r["run_id"] != "live-run" for r in runs))


def test_with_a_token_a_post_needs_it(tmp_path):
    stack = RunningStack(tmp_path / "stack", {"TRACKSIDE_CONSOLE_TOKEN": "s3cret"})
    stack.start()
    try:
        assert stack.api("/healthz")[0] == 200  # reads stay open on 127.0.0.1
        body = b'{"reason": "test"}'
        assert stack.api("/api/v1/runs/r1/stop", method="POST", body=body, headers=JSON_BODY)[0] == 401
        assert stack.api("/api/v1/runs/r1/stop", method="POST", body=body,
                         headers={**JSON_BODY, "Authorization": "Bearer wrong"})[0] == 401
        status, control = stack.api("/api/v1/runs/r1/stop", method="POST", body=body,
                                    headers={**JSON_BODY, "Authorization": "Bearer s3cret"})
        assert status == 201 and control["run_id"] == "r1"
    finally:
        assert stack.stop() == 0


def test_trackside_console_serves_the_same_api_beside_up(demo):
    import signal
    import subprocess
    import urllib.request

    from tests.conftest import free_port

    stack, _, _ = demo
    port = free_port()
    console = subprocess.Popen([str(stack.trackside), "console"], env={**stack.env, "TRACKSIDE_CONSOLE_PORT": str(port)},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert console.stdout.readline().strip() == f"trackside console http://127.0.0.1:{port}/"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/fleet?hours=1000", timeout=30) as response:
            assert orjson.loads(response.read()) == stack.api("/api/v1/fleet?hours=1000")[1]
    finally:
        console.send_signal(signal.SIGINT)
        assert console.wait(30) == 0
