"""Shadow versions (SPEC §5) through the real broker, processors and chdb: a shadow's runs are
analysed against stable like a canary's and its verdict lands in `canaries`, but a bad shadow is
never rolled back or paused; deployed as a canary afterwards, it is judged afresh and rolled back."""

import orjson
import pytest

from jobs.publish import agent_key, publish_lines
from streams.contracts import topics
from tests.conftest import RunningStack, canary_runs
from tests.waiting import wait_until

pytestmark = pytest.mark.integration

T0 = 1_796_000_000_000  # 2026-11-30: event times may not be more than a day ahead
AGENT = "mirror-bot"


def runs(version: str, n: int, success: float, start: int, seed: int, prefix: str = "") -> list[dict]:
    return canary_runs(AGENT, version, n, success, start, seed, prefix)


def deploy(stack: RunningStack, *deployments: dict) -> None:
    before = stack.count("SELECT count() FROM deployments WHERE agent_id = {a:String}", {"a": AGENT})
    assert publish_lines(stack.settings, [orjson.dumps(d) for d in deployments], topic=topics.AGENT_DEPLOYMENTS.name,
                         key=agent_key).produced == len(deployments)
    stack.wait_for_count("SELECT count() FROM deployments WHERE agent_id = {a:String}", before + len(deployments),
                         timeout=30, parameters={"a": AGENT})


def play(stack: RunningStack, events: list[dict]) -> None:
    events.sort(key=lambda e: (e["ts"], e["event_id"]))
    assert publish_lines(stack.settings, [orjson.dumps(e) for e in events]).rejected == 0


def mine(messages: list[dict], key: str = "agent_id") -> list[dict]:
    return [m for m in messages if m.get(key) == AGENT]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """This module's stack, with its console: the API shows the shadow's role."""
    yield from RunningStack(tmp_path_factory.mktemp("shadow")).with_console().running()


@pytest.fixture(scope="module")
def shadowed(stack):
    """v1 stable; v2 a shadow (no traffic_pct: copies of all of it) that fails four runs in five."""
    deploy(stack, {"agent_id": AGENT, "version": "v1", "role": "stable", "traffic_pct": 100, "ts": T0},
           {"agent_id": AGENT, "version": "v2", "role": "shadow", "ts": T0 + 1})
    play(stack, runs("v1", 120, 0.95, T0 + 1000, 1) + runs("v2", 60, 0.2, T0 + 1500, 2))
    wait_until(lambda: stack.query("SELECT decision FROM canaries WHERE agent_id = {a:String}", {"a": AGENT}), 90,
               "the shadow's verdict", done=lambda rows: [r["decision"] for r in rows] == ["rollback"])
    stack.wait_until_processed()  # whatever the verdict led to is on the topics and in the tables now
    return stack


def test_a_bad_shadow_is_judged_in_canaries_and_never_rolled_back_or_paused(shadowed):
    (row,) = shadowed.query("SELECT role, decision, stable_version, inferred, canary_runs, reason FROM canaries "
                            "WHERE agent_id = {a:String}", {"a": AGENT})
    assert (row["role"], row["decision"], row["stable_version"], row["inferred"]) == ("shadow", "rollback", "v1", False)
    assert 20 <= int(row["canary_runs"]) < 60 and "success_rate" in row["reason"]
    # no rollback decision and no pause, on the topics or in the tables
    assert mine(shadowed.on_topic(topics.ROLLBACKS.name)) == []
    assert shadowed.count("SELECT count() FROM rollbacks WHERE agent_id = {a:String}", {"a": AGENT}) == 0
    assert [c["action"] for c in mine(shadowed.on_topic(topics.CONTROLS.name))] == []
    assert shadowed.count("SELECT count() FROM controls WHERE agent_id = {a:String}", {"a": AGENT}) == 0
    # what was worse is said, as warnings that ask for no action (beside the failure modes' alerts)
    alerts = mine(shadowed.on_topic(topics.ALERTS.name))
    assert not [a for a in alerts if a.get("action")]
    verdict = [a for a in alerts if a["kind"] != "failure_cluster"]
    assert "success_rate" in {a["kind"] for a in verdict}
    assert {(a["severity"], a["status"]) for a in verdict} == {("warning", "firing")}
    assert all(a["summary"].startswith(f"shadow {AGENT} v2 worse than v1") for a in verdict), verdict


def test_the_console_and_versions_show_the_shadow_role(shadowed):
    status, analysis = shadowed.api(f"/api/v1/canaries/{AGENT}/v2")
    assert status == 200 and (analysis["role"], analysis["verdict"]) == ("shadow", "rollback")
    status, fleet = shadowed.api("/api/v1/fleet")
    rows = {r["agent_version"]: r for r in fleet if r["agent_id"] == AGENT}
    assert (rows["v2"]["role"], rows["v2"]["state"]) == ("shadow", "canary")  # under analysis, never rolled_back
    assert (rows["v1"]["role"], rows["v1"]["state"]) == ("stable", "healthy")
    listing = shadowed.cli("versions", AGENT).stdout.decode().splitlines()
    (v2,) = [line for line in listing if line.startswith("v2 ")]
    assert "shadow" in v2.split() and "rollback (shadow)" in v2 and v2.split()[-2] == "0", listing


def test_the_shadow_deployed_as_a_canary_is_judged_afresh_and_rolled_back(shadowed):
    since = T0 + 600_000
    deploy(shadowed, {"agent_id": AGENT, "version": "v2", "role": "canary", "traffic_pct": 30, "ts": since})
    play(shadowed, runs("v1", 120, 0.95, since + 1000, 3, "live-") + runs("v2", 60, 0.2, since + 1500, 4, "live-"))
    (decision,) = wait_until(lambda: mine(shadowed.on_topic(topics.ROLLBACKS.name)), 90, "the canary's rollback")
    assert (decision["from_version"], decision["to_version"], decision["evidence"]["since"]) == ("v2", "v1", since)
    # judged on the canary's own runs: none of the shadow's
    assert 20 <= decision["evidence"]["canary_runs"] < 60
    pauses = wait_until(lambda: mine(shadowed.on_topic(topics.CONTROLS.name)), 30, "the canary's pause")
    assert [(c["action"], c["agent_version"]) for c in pauses] == [("pause_version", "v2")]
    (row,) = shadowed.query("SELECT role, decision FROM canaries WHERE agent_id = {a:String}", {"a": AGENT})
    assert (row["role"], row["decision"]) == ("canary", "rollback")
    # the shadow's warnings resolved when it stopped being a shadow
    alerts = mine(shadowed.on_topic(topics.ALERTS.name))
    shadow_fingerprints = {a["fingerprint"] for a in alerts if a["summary"].startswith("shadow ")}
    assert shadow_fingerprints and shadow_fingerprints == {
        a["fingerprint"] for a in alerts if a["status"] == "resolved" and a["kind"] != "failure_cluster"}
