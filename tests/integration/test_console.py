"""The console's JSON API (SPEC §10) on the demo's fleet, on the real embedded stack: what each
endpoint returns, the live runs as events arrive, the Stop endpoint and the token rules."""

import time

import orjson
import pytest
from confluent_kafka import Producer

from jobs.demo import DEMO_SPAN_MS, MALFORMED, demo_deployments
from jobs.publish import agent_key, publish_lines
from jobs.simulate import DEFAULT_CANARY, HOUR_MS, FleetConfig, genai_prices_fn, run_labels, simulate, truth
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
    stack = RunningStack(tmp_path_factory.mktemp("console")).with_console()
    stack.start()
    try:
        # the demo's fleet, ending about now as in the demo: the live runs the tests add come right after
        start_ms = (time.time_ns() // 1_000_000 - DEMO_SPAN_MS) // HOUR_MS * HOUR_MS
        config = FleetConfig(seed=7, runs=600, canary=DEFAULT_CANARY, price_fn=genai_prices_fn, start_ms=start_ms)
        report = publish_lines(stack.settings, [orjson.dumps(d) for d in demo_deployments(config)],
                               topic=topics.AGENT_DEPLOYMENTS.name, key=agent_key)
        assert report.produced == 3
        events = list(simulate(config))
        lines = [orjson.dumps(event) for event in events] + list(MALFORMED)  # and what bad producers send
        assert publish_lines(stack.settings, lines).rejected == 0
        runs = len(run_labels(config))
        assert stack.wait_for_count("SELECT count() FROM runs", runs, timeout=120) == runs
        assert stack.wait_for_count("SELECT count() FROM rollbacks", 1, timeout=60) == 1
        assert stack.wait_for_count("SELECT count() FROM dead_letters", len(MALFORMED), timeout=60) == len(MALFORMED)
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
    stack = RunningStack(tmp_path / "stack", {"TRACKSIDE_CONSOLE_TOKEN": "s3cret"}).with_console()
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

    def get(path: str) -> object:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as response:
            return orjson.loads(response.read())

    try:
        assert console.stdout.readline().strip() == f"trackside console http://127.0.0.1:{port}/"
        assert get("/api/v1/fleet?hours=1000") == stack.api("/api/v1/fleet?hours=1000")[1]
        # its live view follows the topics (up's is fed by its sink): a run opens, then closes
        wait_until(lambda: get("/healthz"), 30, "the console to follow the topics", done=lambda health: health["live"])
        now = time.time_ns() // 1_000_000
        producer = Producer({"bootstrap.servers": f"127.0.0.1:{stack.port}"})
        for n, kind in enumerate(("run_start", "tool_call", "run_end")):
            event = {"event_id": f"apart-{n}", "ts": now + n, "type": kind, "run_id": "apart-run", "agent_id": "apart-bot",
                     "agent_version": "v1", **({"tool": "lookup"} if kind == "tool_call" else {"outcome": "success"}
                                               if kind == "run_end" else {})}
            producer.produce("agent.events", value=orjson.dumps(event), key=b"apart-run")
            assert producer.flush(10) == 0
            if kind == "tool_call":
                runs = wait_until(lambda: get("/api/v1/runs/live"), 30, "the open run in the console's live view",
                                  done=lambda runs: any(r["run_id"] == "apart-run" for r in runs))
                assert [(r["steps"], r["last_tool"]) for r in runs if r["run_id"] == "apart-run"] == [(1, "lookup")]
        wait_until(lambda: get("/api/v1/runs/live"), 30, "the closed run to leave the console's live view",
                   done=lambda runs: all(r["run_id"] != "apart-run" for r in runs))
    finally:
        console.send_signal(signal.SIGINT)
        assert console.wait(30) == 0


# --- the pages, in a real headless Chromium (Debian's chromium and chromedriver) -----------------------

SCRIPT = "<script>window.__pwned = 1</script><img src=x onerror=\"window.__pwned = 2\">"


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from jobs.screenshots import chromium

    driver = chromium(1400, 1000, browser_log=True)
    shots = tmp_path_factory.mktemp("screenshots")
    print(f"\nconsole screenshots in {shots}")
    driver.shots = shots
    yield driver
    driver.quit()


def _page(browser, stack, path: str, shot: str, ready_css: str) -> None:
    """Open a page, wait for what shows it rendered with data, screenshot it, and check the
    browser logged no error (a failed request, a script error)."""
    from selenium.webdriver.common.by import By

    browser.get_log("browser")  # what earlier pages logged
    browser.get(f"http://127.0.0.1:{stack.console_port}{path}")
    wait_until(lambda: browser.find_elements(By.CSS_SELECTOR, ready_css), 30, f"{ready_css} on {path}", done=bool)
    browser.save_screenshot(str(browser.shots / f"{shot}.png"))
    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert not errors, (path, errors)


def test_every_page_renders_with_data_and_no_error(demo, browser):
    from selenium.webdriver.common.by import By

    stack, expected, _ = demo
    _page(browser, stack, "/?hours=6", "fleet", "#fleet tbody tr.state-rolled_back")  # the 2-hour fleet in 15-minute buckets
    shown = {tuple(row.text.split()[:2]) for row in browser.find_elements(By.CSS_SELECTOR, "#fleet tbody tr")}
    assert shown >= set(expected["groups"])  # and the live runs the other tests added, if they ran first
    assert browser.find_elements(By.CSS_SELECTOR, "#fleet svg.spark polyline"), "sparklines drawn"
    _page(browser, stack, "/live", "live", "#live-status.on")
    loop_run = stack.query("SELECT run_id FROM runs WHERE loop_detected ORDER BY run_id LIMIT 1")[0]["run_id"]
    _page(browser, stack, f"/runs/{loop_run}", "run", ".waterfall .bar-row.looping")
    assert browser.find_elements(By.CSS_SELECTOR, "#events tbody tr")
    _page(browser, stack, "/alerts?status=firing", "alerts", "#alerts tbody tr[data-alert]")
    _page(browser, stack, "/canaries", "canaries", "#canaries tbody tr")
    _page(browser, stack, f"/canaries/support-bot/{DEFAULT_CANARY.version}", "canary", "#canary-chart canvas")
    assert "Rolled back to v1.4.2" in browser.find_element(By.TAG_NAME, "body").text
    _page(browser, stack, "/drift", "drift", "table.heatmap td.cell a")
    cell = browser.find_elements(By.CSS_SELECTOR, "table.heatmap td.cell a")[0].get_attribute("href")
    _page(browser, stack, cell.removeprefix(f"http://127.0.0.1:{stack.console_port}"), "drift-cell",
          "#distributions tbody tr")
    _page(browser, stack, "/tools", "tools", "#tools tbody tr")
    assert {row.text.split()[0] for row in browser.find_elements(By.CSS_SELECTOR, "#tools tbody tr")} >= {
        "lookup_order", "send_email"}
    _failure_modes_page(browser, stack)
    _page(browser, stack, "/dead-letters", "dead-letters", "#dead-letters tbody tr")
    assert "agent.events" in browser.find_element(By.ID, "dead-letters").text
    _page(browser, stack, "/pipeline", "pipeline", "#pipeline[data-refreshed] #pipeline-totals")
    assert "events ingested" in browser.find_element(By.ID, "pipeline").text


MODES_IN_RANGE = """
WITH (SELECT max(ended_at) FROM runs FINAL) AS newest
SELECT failure_cluster_id AS cid, count() AS n FROM runs FINAL
WHERE failure_cluster_id != '' AND ended_at > newest - toIntervalHour(6)
  AND ({agent_id:String} = '' OR agent_id = {agent_id:String})
GROUP BY cid
"""


def _failure_modes_page(browser, stack) -> None:
    """Every mode of the range with its runs in it, a trend drawn by uPlot, the agents it failed,
    example runs that open on the Run page; the agent filter keeps that agent's runs only."""
    from selenium.webdriver.common.by import By

    stack.wait_until_processed()  # the modes of the runs the other tests ended, landed before the page is read
    _page(browser, stack, "/failure-modes?hours=6", "failure-modes", "#failure-modes div.trend[data-drawn] canvas")
    stored = {r["cid"]: int(r["n"]) for r in stack.query(MODES_IN_RANGE, {"agent_id": ""})}
    rows = browser.find_elements(By.CSS_SELECTOR, "#failure-modes tbody tr[data-mode]")
    shown = {row.get_attribute("data-mode"): int(row.find_elements(By.TAG_NAME, "td")[1].text) for row in rows}
    assert len(stored) >= 8 and shown == stored
    assert len(browser.find_elements(By.CSS_SELECTOR, "#failure-modes div.trend canvas")) == len(rows)
    loops = [row for row in rows if row.find_element(By.CSS_SELECTOR, "td.mode .badge").text == "loop"]
    assert len(loops) == 1 and {"support-bot", "research-agent", "coder"} <= {
        b.text for b in loops[0].find_elements(By.CSS_SELECTOR, "td.agents b")}, "every agent's loops: one mode"
    first = rows[0]
    mode, label = first.get_attribute("data-mode"), first.find_element(By.CSS_SELECTOR, "td.mode .label").text
    example = first.find_element(By.CSS_SELECTOR, "td.examples a").get_attribute("href")
    run_id = example.rsplit("/runs/", 1)[1]
    assert stack.query("SELECT failure_cluster_id FROM runs FINAL WHERE run_id = {r:String}", {"r": run_id}) == [
        {"failure_cluster_id": mode}]
    _page(browser, stack, example.removeprefix(f"http://127.0.0.1:{stack.console_port}"), "failure-mode-run",
          "#events tbody tr")
    assert label in browser.find_element(By.CSS_SELECTOR, "dl.facts").text
    # one agent: its runs only
    _page(browser, stack, "/failure-modes?hours=6&agent_id=research-agent", "failure-modes-agent",
          "#failure-modes tbody tr[data-mode]")
    mine = {r["cid"]: int(r["n"]) for r in stack.query(MODES_IN_RANGE, {"agent_id": "research-agent"})}
    rows = browser.find_elements(By.CSS_SELECTOR, "#failure-modes tbody tr[data-mode]")
    assert {row.get_attribute("data-mode"): int(row.find_elements(By.TAG_NAME, "td")[1].text) for row in rows} == mine
    assert mine and set(mine) < set(stored)


def test_live_runs_and_alerts_appear_without_a_reload_and_stop_sends_a_control(demo, browser):
    from selenium.webdriver.common.by import By

    stack, _, _ = demo
    _page(browser, stack, "/live", "live-before", "#live-status.on")
    marker = browser.find_element(By.TAG_NAME, "h1")  # the same element after the run appears: no reload
    now = time.time_ns() // 1_000_000
    producer = Producer({"bootstrap.servers": f"127.0.0.1:{stack.port}"})
    lookup = {"tool": "lookup", "args": {"order": 7}}
    for n, (kind, fields) in enumerate([("run_start", {}), ("tool_call", lookup), ("tool_call", lookup)]):
        event = {"event_id": f"page-run-{n}", "ts": now + n, "type": kind, "run_id": "page-run",
                 "agent_id": "page-bot", "agent_version": "v1", **fields}
        producer.produce("agent.events", value=orjson.dumps(event), key=b"page-run")
    assert producer.flush(10) == 0
    row = wait_until(lambda: browser.find_elements(By.CSS_SELECTOR, '#live-runs tr[data-run="page-run"]'), 30,
                     "the new run on the live page", done=bool)[0]
    assert marker.is_displayed() and "page-bot" in row.text

    # Stop: a reason asked for, then the control on the topic
    row.find_element(By.CSS_SELECTOR, "button.stop").click()
    prompt = wait_until(lambda: _alert(browser), 10, "the reason prompt", done=bool)
    prompt.send_keys("stopped from the console test")
    prompt.accept()
    wait_until(lambda: browser.find_elements(By.ID, "stop-note"), 10, "the stop note", done=bool)
    assert "stop_run" in browser.find_element(By.ID, "stop-note").text
    stops = wait_until(lambda: [c for c in stack.on_topic("trackside.controls") if c["run_id"] == "page-run"], 30,
                       "the stop control", done=bool)
    assert [(c["action"], c["reason"]) for c in stops] == [("stop_run", "stopped from the console test")]

    # a new alert on the alerts page: the third identical call makes a loop alert
    _page(browser, stack, "/alerts", "alerts-before", "#alerts tbody tr")
    event = {"event_id": "page-run-3", "ts": now + 3, "type": "tool_call", "run_id": "page-run",
             "agent_id": "page-bot", "agent_version": "v1", **lookup}
    producer.produce("agent.events", value=orjson.dumps(event), key=b"page-run")
    assert producer.flush(10) == 0
    new = wait_until(lambda: browser.find_elements(By.CSS_SELECTOR, "#alerts tbody tr.new"), 30,
                     "the loop alert on the alerts page", done=bool)
    assert "page-run" in new[0].text and "loop" in new[0].text
    browser.save_screenshot(str(browser.shots / "alerts-live.png"))


def _alert(browser):
    from selenium.common.exceptions import NoAlertPresentException

    try:
        return browser.switch_to.alert
    except NoAlertPresentException:
        return None


def test_strings_from_agents_show_as_text(demo, browser):
    from selenium.webdriver.common.by import By

    stack, _, _ = demo
    now = time.time_ns() // 1_000_000
    producer = Producer({"bootstrap.servers": f"127.0.0.1:{stack.port}"})
    for n, (kind, fields) in enumerate([
            ("run_start", {}),
            ("tool_call", {"tool": SCRIPT, "status": "error", "error_type": "<b>Boom</b>", "error_message": SCRIPT}),
            ("run_end", {"outcome": "failure", "error_message": SCRIPT})]):
        event = {"event_id": f"xss-{n}", "ts": now + n, "type": kind, "run_id": "xss-run", "agent_id": "xss-bot",
                 "agent_version": "v1", **fields}
        producer.produce("agent.events", value=orjson.dumps(event), key=b"xss-run")
    assert producer.flush(10) == 0
    assert stack.wait_for_count("SELECT count() FROM runs WHERE run_id = 'xss-run'", 1) == 1
    _page(browser, stack, "/runs/xss-run", "untrusted", "#events tbody tr.tool_call")
    assert SCRIPT in browser.find_element(By.CSS_SELECTOR, "#events tbody tr.tool_call").text
    assert browser.execute_script("return window.__pwned === undefined")
    assert not browser.find_elements(By.CSS_SELECTOR, "#events b, #events img")
    # the run's failure mode: its label is the masked message, markup and all, shown as text
    assert stack.wait_for_count("SELECT count() FROM runs FINAL WHERE run_id = 'xss-run' AND failure_cluster_id != ''",
                                1) == 1
    _page(browser, stack, "/failure-modes?agent_id=xss-bot", "untrusted-mode", "#failure-modes tbody tr[data-mode]")
    label = browser.find_element(By.CSS_SELECTOR, "#failure-modes tbody tr[data-mode] td.mode .label").text
    assert "<script>" in label and "</script>" in label
    assert browser.find_element(By.CSS_SELECTOR, "#failure-modes td.agents").text.startswith("xss-bot")
    assert browser.execute_script("return window.__pwned === undefined")
    assert not browser.find_elements(By.CSS_SELECTOR, "#failure-modes td.mode b, #failure-modes img, "
                                                      "#failure-modes script")
