"""`python -m jobs.soak`, shortened: every event and run published lands once, and the samples
(CSV), the counts (JSON) and the memory plot (PNG) are written. Without the restart: with one, the
job lasts more than a minute (the drain at SIGTERM alone takes 30 s while the publisher goes on)
and today loses events (jobs/README.md, "Soak")."""

import csv
import subprocess
import sys

import orjson
import pytest

pytestmark = pytest.mark.integration


def test_a_short_soak_lands_every_event_and_run_once_and_writes_its_samples_and_plot(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "jobs.soak", "--minutes", "0.2", "--rate", "500", "--restart-at", "0",
         "--sample-seconds", "5", "--probe-seconds", "5", "--query-seconds", "3", "--settle-seconds", "60",
         "--out", str(out), "--data-dir", str(tmp_path / "data")],
        capture_output=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()[-3000:]
    counts = orjson.loads(next(out.glob("soak-*-summary.json")).read_bytes())
    published = counts["events_distinct_published"]
    assert published == counts["events_published"] == counts["events_delivered"] > 4000
    assert counts["events_final"] == counts["events_distinct_stored"] == published
    assert counts["runs_final"] == counts["runs_distinct_stored"] == counts["runs_published"] > 0
    assert counts["delivery_errors"] == 0
    samples = list(csv.DictReader(open(next(out.glob("soak-*[0-9].csv")))))
    assert len(samples) >= 3 and all(float(row["stack_mb"]) > 0 for row in samples)
    assert next(out.glob("soak-*.png")).read_bytes().startswith(b"\x89PNG")
