"""Spans made by the real OpenTelemetry SDK, serialised as the Collector's Kafka exporter
writes them (otlp_proto and otlp_json), through the whole pipeline to `runs`."""

import orjson
import pytest
from confluent_kafka import Producer
from opentelemetry.trace import Status, StatusCode

from tests.unit.test_otlp import Agent, collector_json, run_agent, trace_hex

pytestmark = pytest.mark.integration


def _produce(stack, values: list[bytes]) -> None:
    producer = Producer({"bootstrap.servers": f"127.0.0.1:{stack.port}"})
    for value in values:
        producer.produce("otlp_spans", value=value)  # the exporter's messages have no run key
    assert producer.flush(10) == 0


def test_otlp_runs_land_with_their_calls_cost_and_outcome(stack):
    good, bad = Agent(), Agent()
    ok_root = run_agent(good)
    failed_root = run_agent(bad, root_status=Status(StatusCode.ERROR, "gave up"),
                            tool_status=Status(StatusCode.ERROR, "upstream 503"))
    _produce(stack, [good.traces().SerializeToString(), collector_json(bad.traces()), b"\x00not protobuf"])

    runs = {trace_hex(ok_root): "success", trace_hex(failed_root): "failure"}
    sql = "SELECT count() FROM runs WHERE run_id IN {ids:Array(String)}"
    assert stack.wait_for_count(sql, 2, timeout=60, parameters={"ids": list(runs)}) == 2
    rows = {row["run_id"]: row for row in stack.query(
        "SELECT run_id, agent_id, agent_version, outcome, llm_calls, tool_calls, tool_errors, input_tokens, "
        "output_tokens, toFloat64(cost_usd) AS cost, tool_path, session_id FROM runs WHERE run_id IN {ids:Array(String)}",
        {"ids": list(runs)})}
    assert {run_id: row["outcome"] for run_id, row in rows.items()} == runs
    for row in rows.values():
        assert (row["agent_id"], row["agent_version"], row["session_id"]) == ("support-bot", "v7", "conv-42")
        assert (row["llm_calls"], row["tool_calls"], row["input_tokens"], row["output_tokens"]) == (1, 1, 1200, 80)
        assert row["tool_path"] == ["search_orders"] and row["cost"] > 0  # priced by genai-prices (gpt-4o)
    assert rows[trace_hex(failed_root)]["tool_errors"] == 1
    # the unreadable message is a dead letter with its reason and origin
    assert stack.wait_for_count("SELECT count() FROM dead_letters WHERE topic = 'otlp_spans'", 1) == 1
    (dead,) = stack.query("SELECT error, source FROM dead_letters WHERE topic = 'otlp_spans'")
    assert dead["source"].startswith("otlp_spans:") and dead["error"]
    # redelivery of the same spans counts once
    _produce(stack, [good.traces().SerializeToString()])
    stack.wait_until_processed()
    assert stack.count(sql, {"ids": list(runs)}) == 2
    assert stack.count(f"SELECT count() FROM events WHERE run_id = '{trace_hex(ok_root)}'") == 4
