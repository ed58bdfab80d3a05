"""The whole path on the real embedded broker and chdb: publish -> ingest -> faust -> ClickHouse.

Counts are exact; cost per successful task is checked against genai-prices' exact
calculation done here, independently of the pipeline's fast price path.
"""

from __future__ import annotations

import json
import orjson
import pytest
from confluent_kafka import Producer

from jobs.simulate import FleetConfig, genai_prices_fn, simulate, truth
from tests.conftest import read_to_end
from tests.malformed import MALFORMED
from tests.waiting import wait_until

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def fleet(stack, tmp_path_factory):
    """A simulated fleet published through `trackside publish`, with duplicates, plus malformed messages."""
    config = FleetConfig(seed=11, runs=300, price_fn=genai_prices_fn, cost_fraction=0.3)
    events = list(simulate(config))
    path = tmp_path_factory.mktemp("fleet") / "fleet.jsonl"
    duplicates = events[::10]  # every tenth event delivered twice
    path.write_bytes(b"\n".join(orjson.dumps(event) for event in events + duplicates) + b"\n")
    published = stack.cli("publish", str(path))
    # Malformed messages go straight to the topic: some (empty, null value) cannot be lines of a file.
    producer = Producer({"bootstrap.servers": f"127.0.0.1:{stack.port}"})
    for _, value, _ in MALFORMED:
        producer.produce("agent.events", value=value, key=b"bad")
    producer.produce("agent.events", value=None, key=b"tombstone")
    producer.flush(10)
    return {"events": events, "duplicates": duplicates, "published": published, "truth": truth(events, price_fn=genai_prices_fn)}


def test_publish_reports_its_counts(fleet):
    expected = len(fleet["events"]) + len(fleet["duplicates"])
    assert fleet["published"].returncode == 0
    assert f"produced={expected} rejected=0" in fleet["published"].stdout.decode()


def test_every_valid_event_lands_once(stack, fleet):
    expected = len({event["event_id"] for event in fleet["events"]})
    assert stack.wait_for_count("SELECT count() FROM events", expected) == expected
    assert stack.count("SELECT uniqExact(event_id) FROM events") == expected


def test_every_run_lands_once_with_its_outcome(stack, fleet):
    runs = fleet["truth"]["runs"]
    assert stack.wait_for_count("SELECT count() FROM runs", len(runs)) == len(runs)
    landed = {row["run_id"]: row for row in stack.query("SELECT run_id, outcome, steps FROM runs")}
    assert {run_id: (row["outcome"], row["steps"]) for run_id, row in landed.items()} == {
        run_id: (run["outcome"], run["steps"]) for run_id, run in runs.items()
    }


def test_every_malformed_message_is_a_dead_letter_with_its_reason(stack, fleet):
    expected = len(MALFORMED) + 1
    assert stack.wait_for_count("SELECT count() FROM dead_letters", expected) == expected
    reasons = [row["error"] for row in stack.query("SELECT error FROM dead_letters")]
    for name, _, fragment in MALFORMED:
        assert any(fragment in reason for reason in reasons), name
    assert any("no value" in reason for reason in reasons)
    sources = [row["source"] for row in stack.query("SELECT source FROM dead_letters")]
    assert all(source.startswith("agent.events:") for source in sources)


def test_dead_letter_topic_has_the_bytes_and_headers(stack, fleet):
    stack.wait_for_count("SELECT count() FROM dead_letters", len(MALFORMED) + 1)
    seen, _ = wait_until(lambda: read_to_end(stack.settings.kafka_config, "agent.events.dlq"), 30,
                         f"{len(MALFORMED) + 1} dead letters on the topic",
                         done=lambda read: len(read[0]) >= len(MALFORMED) + 1)
    assert sorted(message.value() or b"" for message in seen) == sorted(
        [value or b"" for _, value, _ in MALFORMED] + [b""]
    )
    for message in seen:
        headers = dict(message.headers())
        assert headers["trackside.error"] and headers["trackside.source"].startswith(b"agent.events:")


def test_cost_per_successful_task_matches_an_independent_computation(stack, fleet):
    runs = fleet["truth"]["runs"]
    assert stack.wait_for_count("SELECT sum(runs) FROM agent_metrics", len(runs)) == len(runs)
    groups = fleet["truth"]["groups"]
    from_metrics = stack.query(
        "SELECT agent_id, agent_version, toFloat64(sum(cost_usd)) AS cost, sum(successes) AS successes "
        "FROM agent_metrics GROUP BY agent_id, agent_version"
    )
    assert len(from_metrics) == len(groups)
    for row in from_metrics:
        expected = groups[(row["agent_id"], row["agent_version"])]
        assert int(row["successes"]) == expected["successes"]
        assert row["cost"] / int(row["successes"]) == pytest.approx(expected["cost_per_success"], rel=1e-6)


def test_windowed_metrics_cover_every_run_exactly_once(stack, fleet):
    runs = fleet["truth"]["runs"]
    assert stack.wait_for_count("SELECT sum(runs) FROM agent_metrics", len(runs)) == len(runs)
    per_window = stack.query(
        "SELECT agent_id, agent_version, window_start, runs, successes, toFloat64(cost_usd) AS cost, "
        "toFloat64(cost_per_success) AS cps FROM agent_metrics"
    )
    for row in per_window:
        successes = int(row["successes"])
        if successes:
            assert row["cps"] == pytest.approx(row["cost"] / successes, rel=1e-6, abs=1e-9)
        else:
            assert row["cps"] is None


def test_sql_command_works_while_up_runs(stack, fleet):
    stack.wait_for_count("SELECT count() FROM runs", len(fleet["truth"]["runs"]))
    result = stack.cli("sql", "SELECT toUInt32(count()) AS n FROM runs", "--format", "JSONEachRow")
    assert json.loads(result.stdout) == {"n": len(fleet["truth"]["runs"])}
    pretty = stack.cli("sql", "SELECT 1 AS one")
    assert "one" in pretty.stdout.decode()
    refused = stack.cli("sql", "DROP TABLE trackside.runs", check=False)
    assert refused.returncode == 2 and b"read-only" in refused.stderr
    assert stack.count("SELECT count() FROM system.tables WHERE database = 'trackside' AND name = 'runs'") == 1


def test_failed_runs_are_clustered_and_the_clusters_land(stack, fleet):
    runs = fleet["truth"]["runs"]
    failed = sum(run["outcome"] != "success" for run in runs.values())
    assert stack.wait_for_count("SELECT count() FROM runs WHERE outcome != 'success' AND failure_cluster_id != ''", failed) == failed
    assert stack.count("SELECT count() FROM runs WHERE outcome = 'success' AND failure_cluster_id != ''") == 0
    assert stack.count("SELECT count() FROM runs") == len(runs), "a run with its cluster replaces its plain row"
    clusters = stack.query("SELECT cluster_id, size, label FROM failure_clusters")
    assert clusters and sum(int(row["size"]) for row in clusters) == failed
    assert {row["cluster_id"] for row in clusters} == {
        row["failure_cluster_id"] for row in stack.query("SELECT DISTINCT failure_cluster_id FROM runs WHERE failure_cluster_id != ''")
    }
