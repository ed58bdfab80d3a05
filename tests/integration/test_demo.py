"""`trackside demo` (what `make demo` runs) ends by itself, with every run landed and nothing left running."""

import os
import signal
import subprocess
import urllib.error
import urllib.request
import sys
from pathlib import Path

import orjson
import pytest

from tests.conftest import free_port

pytestmark = pytest.mark.integration


def test_demo_lands_every_run_prints_the_summary_and_serves_its_console(tmp_path):
    console_port = free_port()
    env = {**os.environ, "TRACKSIDE_DATA_DIR": str(tmp_path), "TRACKSIDE_EMBEDDED_PORT": str(free_port()),
           "TRACKSIDE_CONSOLE_PORT": str(console_port)}
    demo = subprocess.Popen([str(Path(sys.executable).parent / "trackside"), "demo", "--serve", "120"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in demo.stdout:  # until the demo says where its console is, then it serves
        lines.append(line)
        if line.startswith("console: "):
            break
    assert lines and lines[-1].startswith(f"console: http://127.0.0.1:{console_port}/ (serving for 120 s"), "".join(lines)
    with urllib.request.urlopen(f"http://127.0.0.1:{console_port}/api/v1/fleet", timeout=30) as response:
        fleet = {(row["agent_id"], row["agent_version"]): row for row in orjson.loads(response.read())}
    assert fleet[("support-bot", "v1.6.0-rc1")]["state"] == "rolled_back"
    # the candidate stopped at the gate was never deployed, so never analysed as a canary
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(f"http://127.0.0.1:{console_port}/api/v1/canaries/support-bot/v1.6.0-rc0", timeout=30)
    assert missing.value.code == 404
    demo.send_signal(signal.SIGINT)
    rest, errors = demo.communicate(timeout=60)
    out = "".join(lines) + rest
    assert demo.returncode == 0, out + errors
    assert "600 of 600 runs landed" in out
    for heading in ("Evaluation gate", "per agent and version", "Alerts sent", "Largest failure clusters", "Canaries"):
        assert heading in out
    # the gate before the canary: the broken candidate is stopped there, the other one passes and
    # is rolled out (and, below, rolled back live); the verdicts as the gates table holds them
    flat = " ".join(out.split())  # rich wraps long lines
    assert ("support-bot v1.6.0-rc0 vs v1.4.2 (a tool-schema change broke its order lookups): "
            "STOPPED AT THE GATE (exit 1): never deployed.") in flat
    assert "support-bot v1.6.0-rc1 vs v1.4.2 (the fix of rc0" in flat
    assert "PASSED (exit 0): rolled out as a 30% canary, judged on real traffic below." in flat
    assert flat.index("Evaluation gate") < flat.index("ROLLED BACK to")
    # the story: the bad canary is rolled back, with when, after how many runs and why
    assert "support-bot v1.6.0-rc1 vs v1.4.2 (roles from agent.deployments" in out and "ROLLED BACK to" in out
    assert "evidence of the support-bot v1.6.0-rc1 rollback" in out
    # the loop closed: the live agent's looping ticket stopped by its client, the others answered;
    # the rolled-back canary refused a new run; the controls in their table
    lines = [line for line in out.splitlines() if line.startswith("  live agent example-agent")]
    assert [line.split("steps: ")[1][:8] for line in lines] == ["success", "success", "stopped:"], out
    assert "is looping" in out.split("ticket 3:")[1]
    assert "support-bot v1.6.0-rc1: a new run is refused by its client, VersionPaused: rolled back to v1.4.2" in out
    assert "Controls (the audit trail" in out and "pause_version │ trackside │        1" in out
    assert not list((tmp_path / "demo" / "run").glob("*.pid")), "a child process was left behind"
    # published all at once, the fleet still gets its drift tests (partitions run ahead of
    # each other; a window is tested once the slowest has passed it)
    sql = subprocess.run(
        [str(Path(sys.executable).parent / "trackside"), "sql", "SELECT count() FROM drift", "--format", "TSV"],
        env={**env, "TRACKSIDE_DATA_DIR": str(tmp_path / "demo")}, capture_output=True, timeout=60, check=True)
    assert int(sql.stdout) > 100
    # each gate is a row of `gates` (the failed one with its alert), and `trackside versions` tells the story
    demo_env = {**env, "TRACKSIDE_DATA_DIR": str(tmp_path / "demo")}
    trackside = str(Path(sys.executable).parent / "trackside")

    def tsv(query: str) -> list[str]:
        return subprocess.run([trackside, "sql", query, "--format", "TSV"], env=demo_env, capture_output=True,
                              timeout=60, check=True).stdout.decode().splitlines()

    assert tsv("SELECT candidate, baseline, environment, tasks, verdict, exit_code FROM gates ORDER BY candidate") == [
        "v1.6.0-rc0\tv1.4.2\teval\t30\tfail\t1", "v1.6.0-rc1\tv1.4.2\teval\t30\tpass\t0"]
    assert tsv("SELECT agent_version, status FROM alerts WHERE kind = 'gate'") == ["v1.6.0-rc0\tfiring"]
    assert tsv("SELECT count() FROM deployments WHERE version = 'v1.6.0-rc0'") == ["0"]
    listing = subprocess.run([trackside, "versions", "support-bot"], env=demo_env, capture_output=True, timeout=60,
                             check=True).stdout.decode().splitlines()
    rows = {line.split()[0]: line.split() for line in listing[2:]}
    # version first_seen(2 words) last_seen(2 words) roles gate canary rollbacks config...
    assert rows["v1.6.0-rc0"][5:9] == ["-", "fail", "-", "0"], listing
    assert rows["v1.6.0-rc1"][5:9] == ["canary", "pass", "rollback", "1"], listing
