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


def test_a_span_naming_no_agent_waits_for_its_run_uncommitted_then_is_a_dead_letter(tmp_path):
    """A span whose run never comes and that names no agent is held (its message not committed
    past, so a restart would read it again), then given up as a dead letter with its own source."""
    from tests.conftest import RunningStack
    from tests.waiting import wait_until

    stack = RunningStack(tmp_path / "stack", {"TRACKSIDE_OTLP_HOLD_SECONDS": "5"})
    stack.start()
    try:
        orphan_agent, good = Agent(resource={}), Agent()
        tool = orphan_agent.span("execute_tool t", attributes={"gen_ai.operation.name": "execute_tool",
                                                               "gen_ai.tool.name": "t"})
        tool.end(end_time=tool.start_time + 5 * 1_000_000)
        root = run_agent(good)
        delivered = []
        producer = Producer({"bootstrap.servers": f"127.0.0.1:{stack.port}"})
        producer.produce("otlp_spans", value=orphan_agent.traces().SerializeToString(),
                         on_delivery=lambda error, message: delivered.append((message.partition(), message.offset())))
        assert producer.flush(10) == 0
        ((partition, offset),) = delivered
        # a later message of the same partition lands: the sink went past the held span's message
        producer.produce("otlp_spans", value=good.traces().SerializeToString(), partition=partition)
        assert producer.flush(10) == 0
        assert stack.wait_for_count(f"SELECT count() FROM runs WHERE run_id = '{trace_hex(root)}'", 1) == 1
        assert stack.committed("trackside-store", "otlp_spans")[partition] <= offset
        source = f"otlp_spans:{partition}:{offset}"
        sql = "SELECT count() FROM dead_letters WHERE source = {source:String} AND error LIKE '%held and given up%'"
        assert stack.wait_for_count(sql, 1, parameters={"source": source}) == 1
        wait_until(lambda: stack.committed("trackside-store", "otlp_spans")[partition], 30,
                   "the commit past the given-up span's message", done=lambda committed: committed > offset)
    finally:
        assert stack.stop() == 0
