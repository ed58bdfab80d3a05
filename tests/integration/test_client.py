"""An agent written with the client (streams/client.py) against the embedded stack: a looping run
is stopped at its next step, a paginating one runs to its end, a paused version's new runs are
refused until it is resumed."""

import pytest

from streams.client import RunStopped, Trackside, VersionPaused
from tests.waiting import wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def client(stack):
    agent = Trackside(f"127.0.0.1:{stack.port}", "client-bot", "v1")
    yield agent
    agent.close()


def test_a_looping_run_is_stopped_at_its_next_step_and_a_paginating_one_runs_to_its_end(stack, client):
    with client.run(task_id="paging") as paging:
        for page in (1, 2, 3):
            paging.check()
            paging.llm_call(model="gpt-4o-mini", provider="openai", input_tokens=300 + 50 * page, output_tokens=12)
            paging.tool_call("list_orders", args={"page": page})
    with pytest.raises(RunStopped) as stopped:
        with client.run(task_id="looping") as looping:
            for _ in range(3):  # the same call three times: a loop
                looping.check()
                looping.llm_call(model="gpt-4o-mini", provider="openai", input_tokens=300, output_tokens=12)
                looping.tool_call("search", args={"q": "where is my order"})
            # the agent's next step comes once the control is there (no fixed wait)
            wait_until(lambda: client.stopped(looping.run_id), 30, "the stop_run control at the client")
            looping.check()
    assert "looping" in stopped.value.reason
    # the stopped run ended `aborted`; the paginating one `success`, never stopped
    sql = "SELECT outcome FROM runs WHERE run_id = {run:String}"
    wait_until(lambda: stack.query(sql, {"run": looping.run_id}), 60, "the stopped run to land",
               done=lambda rows: rows == [{"outcome": "aborted"}])
    assert stack.query(sql, {"run": paging.run_id}) == [{"outcome": "success"}]
    assert client.stopped(paging.run_id) is None and client.dropped == 0


def test_a_paused_version_refuses_new_runs_until_it_is_resumed(stack, client):
    assert stack.cli("pause", "client-bot", "v1", "--reason", "bad canary").returncode == 0

    def refused() -> str | None:
        try:
            client.start_run().end()
        except VersionPaused as paused:
            return paused.reason
        return None

    assert wait_until(refused, 30, "the pause at the client") == "bad canary"
    assert stack.cli("resume", "client-bot", "v1", "--reason", "fixed").returncode == 0
    wait_until(lambda: refused() is None, 30, "the resume at the client", done=lambda ok: ok)


def test_the_example_agent_is_stopped_when_it_loops_and_finishes_its_other_tickets(stack):
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "jobs.example_agent", "--bootstrap", f"127.0.0.1:{stack.port}", "--agent", "example-bot",
         "--tickets", "3", "--loop-every", "3", "--step-ms", "200"],
        capture_output=True, text=True, timeout=120, check=True)
    lines = done.stdout.splitlines()
    assert [line.split()[4] for line in lines] == ["success", "success", "stopped:"], done.stdout
    assert "is looping" in lines[2]


def test_a_runs_guardrail_hits_approvals_and_feedback_land_in_its_row(stack, client):
    run = client.start_run(task_id="refund-7")
    run.llm_call(model="gpt-4o-mini", provider="openai", input_tokens=100, output_tokens=10)
    run.policy_hit("refund_limit", "blocked", tool="refund")
    run.approval("requested", action="refund over $200")
    run.approval("granted", approver="kim", wait_ms=42_000)
    run.end("success")
    run.feedback(0.75, label="helpful", source="user")
    sql = ("SELECT policy_hits, approvals_requested, approvals_granted, approval_waits_ms, feedback_count, "
           "feedback_score, steps FROM runs WHERE run_id = {run:String}")
    row = wait_until(lambda: stack.query(sql, {"run": run.run_id}), 60, "the run with its feedback",
                     done=lambda rows: rows and rows[0]["feedback_count"] == 1)[0]
    assert row == {"policy_hits": {"refund_limit:blocked": 1}, "approvals_requested": 1, "approvals_granted": 1,
                   "approval_waits_ms": [42_000.0], "feedback_count": 1, "feedback_score": 0.75, "steps": 1}
    (feedback,) = stack.query("SELECT label, feedback_source FROM events WHERE run_id = {run:String} "
                              "AND type = 'feedback'", {"run": run.run_id})
    assert feedback == {"label": "helpful", "feedback_source": "user"}
