"""OTLP TracesData -> agent events, with spans made by the real OpenTelemetry SDK and sent the
way the Collector's Kafka exporter sends them (`otlp_proto` bytes and hex-id `otlp_json`)."""

from __future__ import annotations

import base64
import time
from collections.abc import Mapping, Sequence

import orjson
import pytest
from google.protobuf import json_format
from opentelemetry import trace
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, InstrumentationScope, KeyValue, KeyValueList
from opentelemetry.proto.resource.v1.resource_pb2 import Resource as PbResource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, Status, TracesData
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Status as SdkStatus
from opentelemetry.trace import StatusCode
from streams.errors import ConfigError
from streams.contracts.events import args_hash, parse, validate

from streams.ingest.otlp import InvalidOtlp, Mapped, TraceMemory, decode_traces, otlp_to_events, spans_to_events

MS = 1_000_000
# A fixed time an hour ago, whole milliseconds: inside the window `validate` accepts.
T0 = (time.time_ns() // 3_600_000_000_000 - 1) * 3_600_000_000_000

AGENT_RESOURCE = {"service.name": "support-service", "service.version": "2.0.0", "deployment.environment.name": "prod"}


# ---------------------------------------------------------------------------------------
# What the Collector's Kafka exporter would send: spans of the SDK as TracesData bytes.


def any_value(value) -> AnyValue:
    if isinstance(value, bool):
        return AnyValue(bool_value=value)
    if isinstance(value, int):
        return AnyValue(int_value=value)
    if isinstance(value, float):
        return AnyValue(double_value=value)
    if isinstance(value, str):
        return AnyValue(string_value=value)
    if isinstance(value, bytes):
        return AnyValue(bytes_value=value)
    if isinstance(value, Mapping):
        return AnyValue(kvlist_value=KeyValueList(values=key_values(value)))
    if isinstance(value, Sequence):
        return AnyValue(array_value=ArrayValue(values=[any_value(item) for item in value]))
    raise TypeError(value)


def key_values(attributes) -> list[KeyValue]:
    return [KeyValue(key=key, value=any_value(value)) for key, value in (attributes or {}).items()]


def to_traces_data(spans: Sequence[ReadableSpan]) -> TracesData:
    """ReadableSpans grouped by resource, then by instrumentation scope, as OTLP exporters do."""
    traces = TracesData()
    by_resource: dict[int, tuple[ResourceSpans, dict]] = {}
    for span in spans:
        if id(span.resource) not in by_resource:
            resource_spans = traces.resource_spans.add(
                resource=PbResource(attributes=key_values(span.resource.attributes)), schema_url=span.resource.schema_url
            )
            by_resource[id(span.resource)] = (resource_spans, {})
        resource_spans, scopes = by_resource[id(span.resource)]
        scope = span.instrumentation_scope
        key = (scope.name, scope.version)
        if key not in scopes:
            scopes[key] = resource_spans.scope_spans.add(
                scope=InstrumentationScope(name=scope.name, version=scope.version or ""), schema_url=scope.schema_url or ""
            )
        context = span.get_span_context()
        scopes[key].spans.append(PbSpan(
            trace_id=context.trace_id.to_bytes(16, "big"),
            span_id=context.span_id.to_bytes(8, "big"),
            parent_span_id=span.parent.span_id.to_bytes(8, "big") if span.parent else b"",
            name=span.name,
            kind=span.kind.value + 1,  # SDK INTERNAL=0 .. CONSUMER=4; OTLP SPAN_KIND_INTERNAL=1 ..
            start_time_unix_nano=span.start_time,
            end_time_unix_nano=span.end_time,
            attributes=key_values(span.attributes),
            events=[
                PbSpan.Event(time_unix_nano=event.timestamp, name=event.name, attributes=key_values(event.attributes))
                for event in span.events
            ],
            status=Status(code=span.status.status_code.value, message=span.status.description or ""),
        ))
    return traces


def _hex_ids(raw: dict) -> dict:
    """Protobuf JSON (base64 bytes) -> OTLP/JSON (hex trace and span ids), as the spec says."""
    for resource_spans in raw.get("resourceSpans", []):
        for scope_spans in resource_spans.get("scopeSpans", []):
            for span in scope_spans.get("spans", []):
                for key in ("traceId", "spanId", "parentSpanId"):
                    if span.get(key):
                        span[key] = base64.b64decode(span[key]).hex()
    return raw


def collector_json(traces: TracesData) -> bytes:
    """`otlp_json` as the Collector writes it: hex ids, enums as integers, int64 as strings."""
    raw = orjson.loads(json_format.MessageToJson(traces, use_integers_for_enums=True))
    return orjson.dumps(_hex_ids(raw))


class Agent:
    """A TracerProvider of the real SDK with an in-memory exporter."""

    def __init__(self, resource: dict | None = None) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider(resource=Resource.create(AGENT_RESOURCE if resource is None else resource))
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.tracer = self.provider.get_tracer("agent-framework", "1.0")

    def span(self, name, parent=None, start=0, end=1, attributes=None, status=None, events=(), exception=None):
        context = trace.set_span_in_context(parent) if parent is not None else None
        span = self.tracer.start_span(name, context=context, start_time=T0 + start * MS, attributes=attributes)
        for event_name, event_attributes, at in events:
            span.add_event(event_name, event_attributes, timestamp=T0 + at * MS)
        if exception is not None:
            span.record_exception(exception, timestamp=T0 + end * MS)
        if status is not None:
            span.set_status(status)
        return span

    def finished(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def traces(self) -> TracesData:
        return to_traces_data(self.finished())


def run_agent(agent: Agent, root_attributes=None, root_status=None, root_events=(), tool_status=None):
    """One agent run: invoke_agent -> chat (-> an HTTP client span) and execute_tool."""
    root = agent.span("invoke_agent support-bot", start=0, attributes={
        "gen_ai.operation.name": "invoke_agent", "gen_ai.agent.id": "support-bot", "gen_ai.agent.name": "Support Bot",
        "gen_ai.agent.version": "v7", "gen_ai.conversation.id": "conv-42", "gen_ai.provider.name": "openai",
        **(root_attributes or {}),
    }, status=root_status, events=root_events)
    chat = agent.span("chat gpt-4o", parent=root, start=10, attributes={
        "gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o", "gen_ai.response.model": "gpt-4o-2024-08-06",
        "gen_ai.provider.name": "openai", "gen_ai.usage.input_tokens": 1200, "gen_ai.usage.output_tokens": 80,
        "gen_ai.usage.cache_read.input_tokens": 1000, "gen_ai.response.finish_reasons": ["tool_calls"],
        "gen_ai.input.messages": '[{"role": "user", "parts": [{"type": "text", "content": "secret"}]}]',
    })
    http = agent.span("POST", parent=chat, start=11, attributes={"http.request.method": "POST", "server.address": "api.openai.com"})
    http.end(end_time=T0 + 400 * MS)
    chat.end(end_time=T0 + 410 * MS)
    tool = agent.span("execute_tool search_orders", parent=root, start=420, attributes={
        "gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "search_orders", "gen_ai.tool.call.id": "call-1",
        "gen_ai.tool.call.arguments": '{"order_id": "A-17", "limit": 5}', "gen_ai.tool.type": "function",
    }, status=tool_status)
    tool.end(end_time=T0 + 470 * MS)
    root.end(end_time=T0 + 1000 * MS)
    return root


def check(result: Mapped) -> Mapped:
    """Every event passes the agent-event validation, and ids are unique."""
    for event in result.events:
        validate(event)
    ids = [event["event_id"] for event in result.events]
    assert len(ids) == len(set(ids))
    return result


def by_type(result: Mapped) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for event in result.events:
        out.setdefault(event["type"], []).append(event)
    return out


def trace_hex(span) -> str:
    return f"{span.get_span_context().trace_id:032x}"


def span_hex(span) -> str:
    return f"{span.get_span_context().span_id:016x}"


# ---------------------------------------------------------------------------------------
# A full run


def test_full_run_maps_to_run_start_llm_tool_run_end():
    agent = Agent()
    root = run_agent(agent)
    result = check(otlp_to_events(agent.traces().SerializeToString()))
    assert [event["type"] for event in result.events] == ["run_start", "llm_call", "tool_call", "run_end"]
    assert result.rejected == []
    assert result.skipped == {"not_genai": 1}  # the HTTP client span
    run_id = trace_hex(root)
    assert {event["run_id"] for event in result.events} == {run_id}
    for event in result.events:
        assert event["agent_id"] == "support-bot"  # children inherit from their run in the batch
        assert event["agent_version"] == "v7"
        assert event["session_id"] == "conv-42"
        assert event["environment"] == "prod"
    start, llm, tool, end = result.events
    assert start["event_id"] == f"otlp:{run_id}:{span_hex(root)}:start"
    assert end["event_id"] == f"otlp:{run_id}:{span_hex(root)}:end"
    assert start["ts"] == T0 // MS and end["ts"] == T0 // MS + 1000
    assert llm == {
        **llm,
        "ts": T0 // MS + 10, "model": "gpt-4o", "provider": "openai", "input_tokens": 1200, "output_tokens": 80,
        "cache_read_input_tokens": 1000, "latency_ms": 400.0, "status": "ok",
    }
    assert llm["attributes"]["gen_ai.response.model"] == "gpt-4o-2024-08-06"
    assert llm["attributes"]["gen_ai.response.finish_reasons"] == ["tool_calls"]
    assert llm["attributes"]["otel.span_name"] == "chat gpt-4o"
    assert llm["attributes"]["otel.parent_span_id"] == span_hex(root)
    assert "gen_ai.input.messages" not in llm["attributes"]  # content is never kept
    assert "gen_ai.usage.input_tokens" not in llm["attributes"]  # mapped, not repeated
    assert tool["tool"] == "search_orders" and tool["status"] == "ok" and tool["latency_ms"] == 50.0
    assert tool["args"] == {"order_id": "A-17", "limit": 5}
    assert validate(tool)["args_hash"] == args_hash('{"limit":5,"order_id":"A-17"}')
    assert tool["attributes"]["gen_ai.tool.call.id"] == "call-1"
    assert end["outcome"] == "success"
    assert end["attributes"]["trackside.outcome_source"] == "status"
    assert start["attributes"]["gen_ai.agent.name"] == "Support Bot"


def test_proto_and_json_give_identical_events():
    agent = Agent()
    run_agent(agent)
    traces = agent.traces()
    from_proto = check(otlp_to_events(traces.SerializeToString()))
    from_json = check(otlp_to_events(collector_json(traces)))
    assert from_json.events == from_proto.events
    assert from_json.skipped == from_proto.skipped
    # explicit encodings give the same
    assert otlp_to_events(traces.SerializeToString(), "otlp_proto").events == from_proto.events
    assert otlp_to_events(collector_json(traces), "otlp_json").events == from_proto.events


def test_json_with_base64_ids_enum_names_and_numeric_int64_reads_the_same():
    agent = Agent()
    run_agent(agent, root_status=SdkStatus(StatusCode.ERROR, "gave up"))
    traces = agent.traces()
    expected = otlp_to_events(traces.SerializeToString()).events
    plain = json_format.MessageToJson(traces).encode()  # base64 ids, "STATUS_CODE_ERROR", int64 strings
    assert b"STATUS_CODE_ERROR" in plain
    assert check(otlp_to_events(plain)).events == expected
    raw = orjson.loads(collector_json(traces))
    for resource_spans in raw["resourceSpans"]:
        for span in resource_spans["scopeSpans"][0]["spans"]:
            span["startTimeUnixNano"] = int(span["startTimeUnixNano"])
            span["endTimeUnixNano"] = int(span["endTimeUnixNano"])
            for item in span["attributes"]:
                if "intValue" in item["value"]:
                    item["value"]["intValue"] = int(item["value"]["intValue"])
    assert check(otlp_to_events(b"\n  " + orjson.dumps(raw, option=orjson.OPT_INDENT_2))).events == expected


def test_decode_traces_reads_both_encodings_to_the_same_traces_data():
    agent = Agent()
    run_agent(agent)
    traces = agent.traces()
    assert decode_traces(traces.SerializeToString()) == traces
    assert decode_traces(collector_json(traces)) == traces
    assert check(spans_to_events(decode_traces(collector_json(traces)))).events == otlp_to_events(
        traces.SerializeToString()).events


def test_decode_traces_rejects_bad_json_ids():
    with pytest.raises(InvalidOtlp, match="neither hex nor base64"):
        decode_traces(b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "zz", "spanId": "00"}]}]}]}')


def test_normalise_gives_the_rows_parse_gives():
    agent = Agent()
    run_agent(agent)
    value = agent.traces().SerializeToString()
    raw = otlp_to_events(value).events
    rows = otlp_to_events(value, normalise=True).events
    assert rows == [parse(orjson.dumps(event)) for event in raw]
    assert all(row["args"] == "" for row in rows)  # hashed, not stored, unless asked
    kept = otlp_to_events(value, normalise=True, keep_raw_args=True).events
    assert [row["args"] for row in kept if row["type"] == "tool_call"] == ['{"limit":5,"order_id":"A-17"}']


# ---------------------------------------------------------------------------------------
# Attribute names


def test_deprecated_aliases_and_fallbacks():
    agent = Agent()
    root = agent.span("invoke_agent", attributes={"gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": "helper"})
    chat = agent.span("text_completion", parent=root, start=5, attributes={
        "gen_ai.operation.name": "text_completion", "gen_ai.system": "anthropic",
        "gen_ai.response.model": "claude-sonnet-4", "gen_ai.usage.prompt_tokens": 300,
        "gen_ai.usage.completion_tokens": 20,
    })
    chat.end(end_time=T0 + 50 * MS)
    gen = agent.span("generate_content", parent=root, start=60, attributes={
        "gen_ai.operation.name": "generate_content", "gen_ai.provider.name": "gcp.gemini", "gen_ai.system": "vertex_ai",
        "gen_ai.request.model": "gemini-2.5-pro", "gen_ai.usage.input_tokens": 7, "gen_ai.usage.prompt_tokens": 999,
    })
    gen.end(end_time=T0 + 90 * MS)
    root.end(end_time=T0 + 100 * MS)
    llm = by_type(check(otlp_to_events(agent.traces().SerializeToString())))["llm_call"]
    first, second = llm
    assert (first["provider"], first["model"], first["input_tokens"], first["output_tokens"]) == (
        "anthropic", "claude-sonnet-4", 300, 20)
    assert (second["provider"], second["model"], second["input_tokens"]) == ("gcp.gemini", "gemini-2.5-pro", 7)
    assert "output_tokens" not in second  # absent stays absent (validate makes it 0)
    # agent.name stands in for agent.id; version falls back to service.version
    assert {(event["agent_id"], event["agent_version"]) for event in llm} == {("helper", "2.0.0")}


def test_agent_identity_falls_back_to_the_resource_and_version_to_unknown():
    agent = Agent({"service.name": "billing-agent"})
    chat = agent.span("chat", attributes={"gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o-mini"})
    chat.end(end_time=T0 + 10 * MS)
    (event,) = check(otlp_to_events(agent.traces().SerializeToString())).events
    assert (event["agent_id"], event["agent_version"], event["run_id"]) == ("billing-agent", "unknown", trace_hex(chat))
    assert "environment" not in event

    agent = Agent({"service.name": "svc", "gen_ai.agent.id": "resource-agent", "gen_ai.agent.version": "r3",
                   "trackside.tenant": "acme"})
    chat = agent.span("chat", attributes={"gen_ai.operation.name": "chat", "trackside.task_id": "T-9"})
    chat.end(end_time=T0 + 10 * MS)
    (event,) = check(otlp_to_events(agent.traces().SerializeToString())).events
    assert (event["agent_id"], event["agent_version"], event["tenant"], event["task_id"]) == (
        "resource-agent", "r3", "acme", "T-9")


# ---------------------------------------------------------------------------------------
# Run outcome


def evaluation(label=None, value=None, name="task_success", error_type=None, at=900):
    attributes = {"gen_ai.evaluation.name": name}
    if label is not None:
        attributes["gen_ai.evaluation.score.label"] = label
    if value is not None:
        attributes["gen_ai.evaluation.score.value"] = value
    if error_type is not None:
        attributes["error.type"] = error_type
    return ("gen_ai.evaluation.result", attributes, at)


ERROR = SdkStatus(StatusCode.ERROR, "ran out of steps")


@pytest.mark.parametrize(("attributes", "status", "events", "outcome", "source", "score"), [
    ({}, None, (), "success", "status", None),
    ({}, SdkStatus(StatusCode.OK), (), "success", "status", None),
    ({}, ERROR, (), "failure", "status", None),
    ({}, None, (evaluation("pass", 0.9),), "success", "evaluation", 0.9),
    ({}, None, (evaluation("FAIL", 0.2),), "failure", "evaluation", 0.2),
    ({}, ERROR, (evaluation("correct", 1),), "success", "evaluation", 1.0),
    ({}, None, (evaluation("escalated"),), "escalated", "evaluation", None),
    # the last recognised verdict decides; quality labels and failed evaluations do not
    ({}, None, (evaluation("pass", 0.8, at=100), evaluation("fail", 0.1, at=200)), "failure", "evaluation", 0.1),
    ({}, None, (evaluation("fail", 0.1, at=100), evaluation("relevant", 0.7, name="relevance", at=200)),
     "failure", "evaluation", 0.1),
    ({}, ERROR, (evaluation("relevant", 0.7, name="relevance"),), "failure", "status", 0.7),
    ({}, None, (evaluation("fail", error_type="timeout"),), "success", "status", None),
    ({}, None, (evaluation("pass", 4.0),), "success", "evaluation", None),  # outside 0..1: not a score
    # the explicit attribute comes first
    ({"trackside.outcome": "escalated"}, None, (evaluation("pass", 0.9),), "escalated", "attribute", 0.9),
    ({"trackside.outcome": "aborted"}, None, (), "aborted", "attribute", None),
    ({"trackside.outcome": "Success"}, ERROR, (), "success", "attribute", None),
])
def test_outcome_rules(attributes, status, events, outcome, source, score):
    agent = Agent()
    run_agent(agent, root_attributes=attributes, root_status=status, root_events=events)
    result = check(otlp_to_events(agent.traces().SerializeToString()))
    (end,) = by_type(result)["run_end"]
    assert (end["outcome"], end["attributes"]["trackside.outcome_source"], end.get("score")) == (outcome, source, score)
    if events:
        assert len(end["attributes"]["gen_ai.evaluation"]) == len(events)


def test_failed_run_carries_its_error():
    agent = Agent()
    run_agent(agent, root_attributes={"error.type": "MaxTurnsExceeded"}, root_status=ERROR)
    (end,) = by_type(check(otlp_to_events(agent.traces().SerializeToString())))["run_end"]
    assert (end["outcome"], end["error_type"], end["error_message"]) == ("failure", "MaxTurnsExceeded", "ran out of steps")


def test_unknown_outcome_attribute_rejects_the_run_span_only():
    agent = Agent()
    root = run_agent(agent, root_attributes={"trackside.outcome": "won"})
    result = check(otlp_to_events(agent.traces().SerializeToString()))
    assert [event["type"] for event in result.events] == ["llm_call", "tool_call"]
    ((where, reason),) = result.rejected
    assert where == f"{trace_hex(root)}:{span_hex(root)}"
    assert "trackside.outcome must be one of" in reason and "'won'" in reason


# ---------------------------------------------------------------------------------------
# Tool calls


def test_tool_error_timeout_and_exception_event():
    agent = Agent()
    root = agent.span("invoke_agent", attributes={"gen_ai.operation.name": "invoke_agent", "gen_ai.agent.id": "ops"})
    failing = agent.span("execute_tool refund", parent=root, start=1, attributes={
        "gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "refund", "error.type": "PermissionDenied",
    }, status=SdkStatus(StatusCode.ERROR, "refunds above $500 need approval"))
    failing.end(end_time=T0 + 30 * MS)
    slow = agent.span("execute_tool fetch", parent=root, start=40, attributes={
        "gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "fetch", "error.type": "timeout",
    }, status=SdkStatus(StatusCode.ERROR))
    slow.end(end_time=T0 + 5040 * MS)
    raising = agent.span("execute_tool", parent=root, start=50, attributes={
        "gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "lookup",
    }, exception=KeyError("no such customer"), status=SdkStatus(StatusCode.ERROR))
    raising.end(end_time=T0 + 60 * MS)
    # error.type on a span with status UNSET is an error too (the conventions set both)
    unset = agent.span("execute_tool notify", parent=root, start=70, attributes={
        "gen_ai.operation.name": "execute_tool", "error.type": "SMTPError"})
    unset.end(end_time=T0 + 80 * MS)
    root.end(end_time=T0 + 6000 * MS)
    tools = {event["tool"]: event for event in by_type(check(otlp_to_events(agent.traces().SerializeToString())))["tool_call"]}
    assert (tools["refund"]["status"], tools["refund"]["error_type"], tools["refund"]["error_message"]) == (
        "error", "PermissionDenied", "refunds above $500 need approval")
    assert (tools["fetch"]["status"], tools["fetch"]["latency_ms"]) == ("timeout", 5000.0)
    assert (tools["lookup"]["status"], tools["lookup"]["error_type"]) == ("error", "KeyError")
    assert tools["lookup"]["error_message"] == "'no such customer'"
    assert (tools["notify"]["status"], tools["notify"]["error_type"]) == ("error", "SMTPError")  # name from span name


def test_llm_error_status():
    agent = Agent()
    chat = agent.span("chat", attributes={"gen_ai.operation.name": "chat", "error.type": "RateLimitError"},
                      status=SdkStatus(StatusCode.ERROR, "429 Too Many Requests"))
    chat.end(end_time=T0 + 5 * MS)
    (llm,) = check(otlp_to_events(agent.traces().SerializeToString())).events
    assert (llm["status"], llm["error_type"], llm["attributes"]["otel.status_message"]) == (
        "error", "RateLimitError", "429 Too Many Requests")


@pytest.mark.parametrize(("arguments", "args", "hashed"), [
    ('{"q": "shoes", "n": 3}', {"q": "shoes", "n": 3}, None),
    ({"q": "shoes", "n": 3}, {"q": "shoes", "n": 3}, None),  # an OTLP kvlist
    ("q=shoes&n=3", None, args_hash("q=shoes&n=3")),  # not JSON: hashed as text
    ('["shoes", 3]', None, args_hash('["shoes",3]')),  # JSON, not an object: hashed canonical
    (["shoes", "boots"], None, args_hash('["shoes","boots"]')),
])
def test_tool_arguments(arguments, args, hashed):
    agent = Agent()
    tool = agent.span("execute_tool search", attributes={"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "search"})
    tool.end(end_time=T0 + 5 * MS)
    traces = agent.traces()
    span = traces.resource_spans[0].scope_spans[0].spans[0]
    span.attributes.append(KeyValue(key="gen_ai.tool.call.arguments", value=any_value(arguments)))
    for value in (traces.SerializeToString(), collector_json(traces)):
        (event,) = check(otlp_to_events(value)).events
        assert event.get("args") == args
        assert event.get("args_hash") == hashed


# ---------------------------------------------------------------------------------------
# Skipped and rejected spans


def test_non_genai_and_unmapped_operations_are_skipped_with_reasons():
    agent = Agent()
    root = agent.span("invoke_agent planner", attributes={"gen_ai.operation.name": "invoke_agent", "gen_ai.agent.id": "planner"})
    for name, attributes in [
        ("GET /orders", {"http.request.method": "GET"}),
        ("embeddings", {"gen_ai.operation.name": "embeddings", "gen_ai.request.model": "text-embedding-3-small"}),
        ("retrieval", {"gen_ai.operation.name": "retrieval"}),
        ("create_agent", {"gen_ai.operation.name": "create_agent"}),
        ("openai.chat", {"gen_ai.system": "openai", "gen_ai.request.model": "gpt-4"}),  # pre-1.27: no operation
        ("custom", {"gen_ai.operation.name": "rerank"}),
    ]:
        agent.span(name, parent=root, start=1, attributes=attributes).end(end_time=T0 + 2 * MS)
    sub = agent.span("invoke_agent researcher", parent=root, start=3, attributes={
        "gen_ai.operation.name": "invoke_agent", "gen_ai.agent.id": "researcher"})
    sub_chat = agent.span("chat", parent=sub, start=4, attributes={"gen_ai.operation.name": "chat", "gen_ai.usage.input_tokens": 9})
    sub_chat.end(end_time=T0 + 8 * MS)
    sub.end(end_time=T0 + 9 * MS)
    root.end(end_time=T0 + 10 * MS)
    result = check(otlp_to_events(agent.traces().SerializeToString()))
    assert result.skipped == {
        "not_genai": 1, "operation:embeddings": 1, "operation:retrieval": 1, "operation:create_agent": 1,
        "genai_without_operation": 1, "operation:other": 1, "nested_invoke_agent": 1,
    }
    assert result.skipped_total == 7
    assert result.rejected == []
    # the sub-agent's call belongs to the trace's run, under the outermost agent
    assert [(event["type"], event["agent_id"]) for event in result.events] == [
        ("run_start", "planner"), ("llm_call", "planner"), ("run_end", "planner")]


def test_unmappable_spans_are_rejected_with_reasons_while_the_rest_map():
    agent = Agent()
    root = run_agent(agent)
    negative = agent.span("chat", parent=root, start=500, attributes={
        "gen_ai.operation.name": "chat", "gen_ai.usage.input_tokens": -5})
    negative.end(end_time=T0 + 510 * MS)
    text_tokens = agent.span("chat", parent=root, start=520, attributes={
        "gen_ai.operation.name": "chat", "gen_ai.usage.output_tokens": "lots"})
    text_tokens.end(end_time=T0 + 530 * MS)
    nameless = agent.span("tool", parent=root, start=540, attributes={"gen_ai.operation.name": "execute_tool"})
    nameless.end(end_time=T0 + 550 * MS)
    backwards = agent.span("chat", parent=root, start=600, attributes={"gen_ai.operation.name": "chat"})
    backwards.end(end_time=T0 + 590 * MS)
    anonymous = Agent(resource={})  # the SDK's default service.name "unknown_service:..." is no identity
    lost = anonymous.span("chat", start=10, attributes={"gen_ai.operation.name": "chat"})
    lost.end(end_time=T0 + 20 * MS)
    ancient = Agent()
    old = ancient.tracer.start_span("chat", start_time=86_400 * 10**9, attributes={"gen_ai.operation.name": "chat"})
    old.end(end_time=86_401 * 10**9)
    traces = to_traces_data(agent.finished() + anonymous.finished() + ancient.finished())
    for value in (traces.SerializeToString(), collector_json(traces)):
        result = check(otlp_to_events(value))
        assert [event["type"] for event in result.events] == ["run_start", "llm_call", "tool_call", "run_end"]
        reasons = dict(result.rejected)
        assert len(reasons) == 6
        assert "gen_ai.usage.input_tokens must be between 0" in reasons[f"{trace_hex(root)}:{span_hex(negative)}"]
        assert "gen_ai.usage.output_tokens must be a whole number" in reasons[f"{trace_hex(root)}:{span_hex(text_tokens)}"]
        assert "without gen_ai.tool.name" in reasons[f"{trace_hex(root)}:{span_hex(nameless)}"]
        assert "ends before it starts" in reasons[f"{trace_hex(root)}:{span_hex(backwards)}"]
        assert "no agent identity" in reasons[f"{trace_hex(lost)}:{span_hex(lost)}"]
        assert "invalid event" in reasons[f"{trace_hex(old)}:{span_hex(old)}"]
        assert "before 2000" in reasons[f"{trace_hex(old)}:{span_hex(old)}"]


def test_malformed_json_span_is_rejected_alone():
    agent = Agent()
    root = run_agent(agent)
    raw = orjson.loads(collector_json(agent.traces()))
    spans = raw["resourceSpans"][0]["scopeSpans"][0]["spans"]
    chat = next(span for span in spans if span["name"] == "chat gpt-4o")
    chat["startTimeUnixNano"] = "soon"
    tool = next(span for span in spans if span["name"].startswith("execute_tool"))
    tool["spanId"] = "not-an-id"
    result = check(otlp_to_events(orjson.dumps(raw)))
    assert [event["type"] for event in result.events] == ["run_start", "run_end"]
    reasons = dict(result.rejected)
    assert "startTimeUnixNano 'soon' is not an integer" in reasons[f"{trace_hex(root)}:{chat['spanId']}"]
    where = f"resourceSpans[0].scopeSpans[0].spans[{spans.index(tool)}]"  # no usable id: its position
    assert "spanId 'not-an-id' is neither hex nor base64" in reasons[where]


def test_a_malformed_run_span_does_not_reject_its_children():
    agent = Agent({"service.name": "svc"})
    root = run_agent(agent)
    raw = orjson.loads(collector_json(agent.traces()))
    spans = raw["resourceSpans"][0]["scopeSpans"][0]["spans"]
    run_span = next(span for span in spans if span["name"].startswith("invoke_agent"))
    run_span["events"] = [{"name": "gen_ai.evaluation.result", "timeUnixNano": "later"}]
    result = check(otlp_to_events(orjson.dumps(raw)))
    assert [(event["type"], event["agent_id"]) for event in result.events] == [("llm_call", "svc"), ("tool_call", "svc")]
    ((where, reason),) = result.rejected
    assert where == f"{trace_hex(root)}:{span_hex(root)}" and "timeUnixNano 'later' is not an integer" in reason


@pytest.mark.parametrize(("value", "encoding", "reason"), [
    (b"", None, "empty message"),
    (None, None, "empty message"),
    (b"\xff\xff\xff\xff garbage", None, "not OTLP protobuf"),
    (b"\x08\x96\x01", None, "without resource spans"),  # valid protobuf, but not a TracesData
    (b'{"resourceSpans": [', None, "not valid OTLP/JSON"),
    (b'  {"event_id": "e1", "type": "llm_call"}', None, "without resourceSpans"),
    (b'{"resourceSpans": {"a": 1}}', None, "'resourceSpans' must be a list"),
    (b'{"resourceSpans": [{"scopeSpans": [{"spans": [42]}]}]}', None, "is not an object"),
    (b'{"resourceSpans": []}', "otlp_proto", "not OTLP protobuf"),
    (b"\x0a\x02\x0a\x00", "otlp_json", "not valid OTLP/JSON"),
])
def test_undecodable_messages_raise(value, encoding, reason):
    with pytest.raises(InvalidOtlp, match=reason):
        otlp_to_events(value, encoding)


def test_unknown_encoding_and_oversized_message():
    with pytest.raises(ConfigError, match="unknown OTLP encoding"):
        otlp_to_events(b"{}", "jaeger_json")
    with pytest.raises(InvalidOtlp, match="larger than the limit"):
        otlp_to_events(b'{"resourceSpans": []}', max_bytes=10)
    assert otlp_to_events(b'{"resourceSpans": []}') == Mapped([], [], {})


def test_protobuf_that_starts_like_json_is_still_read():
    """TracesData bytes begin with 0x0a (a newline) and the length; length 123 is `{`."""
    agent = Agent({"service.name": "a"})
    chat = agent.span("chat", attributes={"gen_ai.operation.name": "chat"})
    chat.end(end_time=T0 + MS)
    traces = agent.traces()
    resource_spans = traces.resource_spans[0]
    resource_spans.scope_spans[0].ClearField("scope")
    del resource_spans.resource.attributes[1:]  # the SDK's are first; keep service.name only
    resource_spans.resource.attributes[0].CopyFrom(KeyValue(key="service.name", value=any_value("a")))
    resource_spans.schema_url = ""
    padding = 123 - resource_spans.ByteSize() - 2
    assert 0 < padding < 100
    resource_spans.schema_url = "x" * padding
    value = traces.SerializeToString()
    assert value[:2] == b"\n{"
    (event,) = check(otlp_to_events(value)).events
    assert event["agent_id"] == "a"


# ---------------------------------------------------------------------------------------
# Redelivery and batch boundaries


def test_redelivery_gives_the_same_event_ids():
    agent = Agent()
    run_agent(agent)
    value = agent.traces().SerializeToString()
    first, second = otlp_to_events(value), otlp_to_events(value)
    assert [event["event_id"] for event in first.events] == [event["event_id"] for event in second.events]
    assert first.events == second.events
    assert otlp_to_events(collector_json(agent.traces())).events == first.events


def test_a_run_split_over_messages_keeps_one_run_id_and_the_same_event_ids():
    """Spans are exported when they end: the children usually travel before their run."""
    agent = Agent({**AGENT_RESOURCE, "gen_ai.agent.id": "support-bot", "gen_ai.agent.version": "v7"})
    run_agent(agent)
    spans = agent.finished()
    children = [span for span in spans if span.attributes.get("gen_ai.operation.name") != "invoke_agent"]
    runs = [span for span in spans if span.attributes.get("gen_ai.operation.name") == "invoke_agent"]
    whole = check(otlp_to_events(to_traces_data(spans).SerializeToString()))
    first = check(otlp_to_events(collector_json(to_traces_data(children))))
    second = check(otlp_to_events(to_traces_data(runs).SerializeToString()))
    def identity(events):
        return sorted((event["event_id"], event["run_id"], event["agent_id"], event["agent_version"]) for event in events)

    assert identity(first.events + second.events) == identity(whole.events)
    assert len({event["run_id"] for event in whole.events}) == 1
    # gen_ai.conversation.id is on the run's span only: a child split from it has none
    # (the run assembler takes a run's session from whichever event has it).
    assert [event.get("session_id") for event in first.events] == [None, None]

    # Without the agent on the resource, split children fall back to the resource's service.
    agent = Agent()
    run_agent(agent)
    children = [span for span in agent.finished() if span.attributes.get("gen_ai.operation.name") != "invoke_agent"]
    alone = check(otlp_to_events(to_traces_data(children).SerializeToString()))
    assert {(event["agent_id"], event["agent_version"]) for event in alone.events} == {("support-service", "2.0.0")}
    assert {event["run_id"] for event in alone.events} == {trace_hex(agent.finished()[-1])}


def test_the_same_span_twice_in_a_message_maps_once():
    agent = Agent()
    run_agent(agent)
    traces = agent.traces()
    once = otlp_to_events(traces.SerializeToString())
    twice = traces.resource_spans.add()
    twice.CopyFrom(traces.resource_spans[0])
    result = check(otlp_to_events(traces.SerializeToString()))
    assert result.events == once.events
    assert result.skipped["duplicate_span"] == 3  # run, chat, tool (the HTTP span is not_genai)


def test_zero_ids_are_rejected():
    agent = Agent()
    chat = agent.span("chat", attributes={"gen_ai.operation.name": "chat"})
    chat.end(end_time=T0 + MS)
    traces = agent.traces()
    traces.resource_spans[0].scope_spans[0].spans[0].trace_id = bytes(16)
    for value in (traces.SerializeToString(), collector_json(traces)):
        result = otlp_to_events(value)
        assert result.events == []
        assert [reason for _, reason in result.rejected] == ["chat span 'chat': trace id or span id is all zeros"]


def test_attributes_are_bounded():
    agent = Agent()
    many = {f"app.key{i:03d}": i for i in range(100)}
    chat = agent.span("chat", attributes={
        "gen_ai.operation.name": "chat", "gen_ai.agent.id": "a", "app.long": "x" * 5000,
        "gen_ai.output.messages": "secret", "gen_ai.prompt.0.content": "secret", "gen_ai.system_instructions": "secret",
        "app.list": list(range(100)), **many,
    })
    chat.end(end_time=T0 + MS)
    (event,) = check(otlp_to_events(agent.traces().SerializeToString())).events
    attributes = event["attributes"]
    assert len(attributes) <= 64 + 3
    assert len(attributes["app.long"]) == 1024
    assert attributes["app.list"] == list(range(32))
    assert "secret" not in orjson.dumps(attributes).decode()


# ---------------------------------------------------------------------------------------
# OpenInference, two layers of instrumentation, error classes


def openinference_run(agent: Agent, dual_write: bool = False):
    """A run as OpenInference writes it (Phoenix): AGENT -> LLM, TOOL (arguments in input.value)."""
    root = agent.span("support-bot", attributes={"openinference.span.kind": "AGENT", "agent.name": "support-bot",
                                                 "session.id": "s-9", "input.value": "where is my order?"})
    llm = agent.span("ChatCompletion", parent=root, start=10, attributes={
        "openinference.span.kind": "LLM", "llm.model_name": "gpt-4o-mini", "llm.provider": "openai",
        "llm.system": "openai", "llm.token_count.prompt": 310, "llm.token_count.completion": 25,
        "llm.token_count.total": 335, "llm.token_count.prompt_details.cache_read": 128,
        "llm.input_messages.0.message.content": "secret", "output.value": "secret too",
        **({"gen_ai.operation.name": "chat", "gen_ai.usage.input_tokens": 310, "gen_ai.usage.output_tokens": 25}
           if dual_write else {}),
    })
    llm.end(end_time=T0 + 300 * MS)
    tool = agent.span("lookup_order", parent=root, start=310, attributes={
        "openinference.span.kind": "TOOL", "tool.name": "lookup_order", "input.value": '{"order_id": "A-17"}',
        "tool.parameters": '{"type": "object", "properties": {"order_id": {"type": "string"}}}',
        **({"gen_ai.operation.name": "execute_tool",
            "gen_ai.tool.call.arguments": '{"type": "object", "properties": {"order_id": {"type": "string"}}}'}
           if dual_write else {}),
    })
    tool.end(end_time=T0 + 350 * MS)
    root.end(end_time=T0 + 400 * MS)
    return root


@pytest.mark.parametrize("dual_write", [False, True])
def test_openinference_spans_map_like_genai_ones(dual_write):
    agent = Agent(resource={})
    root = openinference_run(agent, dual_write)
    result = check(otlp_to_events(agent.traces().SerializeToString()))
    assert result.rejected == [] and result.skipped == {}
    start, llm, tool, end = result.events
    assert [start["type"], end["type"]] == ["run_start", "run_end"] and end["outcome"] == "success"
    assert {event["run_id"] for event in result.events} == {trace_hex(root)}
    assert {(event["agent_id"], event.get("session_id")) for event in result.events} == {("support-bot", "s-9")}
    assert (llm["model"], llm["provider"], llm["input_tokens"], llm["output_tokens"], llm["cache_read_input_tokens"]) == (
        "gpt-4o-mini", "openai", 310, 25, 128)
    assert (tool["tool"], tool["args"]) == ("lookup_order", {"order_id": "A-17"})  # the arguments, not the schema
    kept = {key for event in result.events for key in event["attributes"]}
    assert not kept & {"input.value", "output.value", "llm.input_messages.0.message.content", "tool.parameters"}


def test_a_root_chain_is_the_run_and_a_nested_one_is_skipped():
    agent = Agent()
    root = agent.span("workflow", attributes={"openinference.span.kind": "CHAIN"})
    step = agent.span("step", parent=root, start=1, attributes={"openinference.span.kind": "CHAIN"})
    step.end(end_time=T0 + 5 * MS)
    root.end(end_time=T0 + 10 * MS)
    result = check(otlp_to_events(agent.traces().SerializeToString()))
    assert [event["type"] for event in result.events] == ["run_start", "run_end"]
    assert result.events[0]["agent_id"] == "support-service" and result.skipped == {"operation:other": 1}


USAGE = {"gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o", "gen_ai.usage.input_tokens": 500,
         "gen_ai.usage.output_tokens": 40}


def one_call_twice(agent: Agent):
    """A run whose one model call has two spans: a framework's (outer) over its client's (inner)."""
    root = agent.span("invoke_agent", attributes={"gen_ai.operation.name": "invoke_agent", "gen_ai.agent.id": "bot"})
    outer = agent.span("chat gpt-4o", parent=root, start=1, attributes=USAGE)
    inner = agent.span("chat gpt-4o", parent=outer, start=2, attributes=USAGE)
    inner.end(end_time=T0 + 90 * MS)
    outer.end(end_time=T0 + 95 * MS)
    return root, outer, inner


def test_a_model_call_instrumented_twice_counts_once():
    """pydantic-ai's `chat` span over openai-v2's `chat` span for the same request."""
    agent = Agent()
    root, outer, inner = one_call_twice(agent)
    # a model call inside another with other usage is another call (an agent calling a model to judge)
    other = agent.span("chat gpt-4o", parent=root, start=100, attributes=USAGE)
    judge = agent.span("chat gpt-4o-mini", parent=other, start=101, attributes={
        **USAGE, "gen_ai.request.model": "gpt-4o-mini", "gen_ai.usage.output_tokens": 3})
    judge.end(end_time=T0 + 150 * MS)
    other.end(end_time=T0 + 160 * MS)
    # a failed call: no usage in either layer
    failed = {"gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o"}
    outer_failed = agent.span("chat gpt-4o", parent=root, start=170, attributes=failed,
                              status=SdkStatus(StatusCode.ERROR, "ModelServerError"))
    inner_failed = agent.span("chat gpt-4o", parent=outer_failed, start=171,
                              attributes={**failed, "error.type": "<class 'openai.InternalServerError'>"},
                              status=SdkStatus(StatusCode.ERROR))
    inner_failed.end(end_time=T0 + 180 * MS)
    outer_failed.end(end_time=T0 + 181 * MS)
    root.end(end_time=T0 + 200 * MS)
    result = check(otlp_to_events(agent.traces().SerializeToString()))
    calls = by_type(result)["llm_call"]
    assert [call["attributes"]["otel.span_id"] for call in calls] == [
        span_hex(outer), span_hex(other), span_hex(judge), span_hex(outer_failed)]
    assert calls[-1]["status"] == "error" and result.skipped == {"nested_llm_call": 2}


def test_an_error_type_written_as_a_class_repr_is_the_class_name():
    agent = Agent()
    chat = agent.span("chat", attributes={"gen_ai.operation.name": "chat", "gen_ai.agent.id": "bot",
                                          "error.type": "<class 'openai.InternalServerError'>"},
                      status=SdkStatus(StatusCode.ERROR, "500"))
    chat.end(end_time=T0 + 5 * MS)
    (llm,) = check(otlp_to_events(agent.traces().SerializeToString())).events
    assert llm["error_type"] == "openai.InternalServerError"
    assert llm["attributes"]["error.type"] == "<class 'openai.InternalServerError'>"


# ---------------------------------------------------------------------------------------
# A trace is one run however its spans travel (TraceMemory)


def one_span_per_message(agent: Agent) -> list[bytes]:
    """Every finished span in a message of its own, in the order they ended (children first)."""
    return [to_traces_data([span]).SerializeToString() for span in agent.finished()]


def test_children_before_their_run_are_held_and_mapped_with_its_identity():
    agent = Agent(resource={})  # no service.name: only the run span names the agent
    root = run_agent(agent)
    memory = TraceMemory()
    results = [otlp_to_events(value, memory=memory, source=f"otlp_spans:0:{n}", now_ms=1)
               for n, value in enumerate(one_span_per_message(agent))]
    *children, last = results
    assert [(len(r.events), r.rejected, r.held) for r in children] == [(0, [], 0), (0, [], 1), (0, [], 1)]  # http, chat, tool
    assert len(memory) == 0 and last.rejected == [] and last.given_up == []
    assert [event["type"] for event in last.events] == ["run_start", "llm_call", "tool_call", "run_end"]
    assert {(e["run_id"], e["agent_id"], e["agent_version"], e["session_id"]) for e in check(last).events} == {
        (trace_hex(root), "support-bot", "v7", "conv-42")}
    # a straggler of the same trace after its run: mapped at once with the run's identity
    late = agent.span("execute_tool notify", parent=root, start=1100, attributes={
        "gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "notify"})
    late.end(end_time=T0 + 1200 * MS)
    (event,) = otlp_to_events(to_traces_data([late]).SerializeToString(), memory=memory, now_ms=2).events
    assert (event["agent_id"], event["agent_version"]) == ("support-bot", "v7")
    # without a memory, the children are rejected for naming no agent, as before
    assert "no agent identity" in otlp_to_events(one_span_per_message(agent)[1]).rejected[0].reason


def test_held_spans_are_given_up_past_the_bounds_with_their_own_source():
    agent = Agent(resource={})
    tools = [agent.span("execute_tool t", start=n, attributes={"gen_ai.operation.name": "execute_tool",
                                                               "gen_ai.tool.name": "t"}) for n in range(3)]
    for tool in tools:
        tool.end(end_time=T0 + 10 * MS)
    memory = TraceMemory(held_spans=2, hold_ms=60_000)
    values = one_span_per_message(agent)
    assert otlp_to_events(values[0], memory=memory, source="otlp_spans:1:7", now_ms=1_000).held == 1
    assert otlp_to_events(values[1], memory=memory, source="otlp_spans:0:8", now_ms=2_000).given_up == []
    assert memory.oldest_held() == {("otlp_spans", 1): 7, ("otlp_spans", 0): 8}
    (over,) = otlp_to_events(values[2], memory=memory, source="otlp_spans:1:9", now_ms=3_000).given_up
    assert over.source == "otlp_spans:1:7" and "more than 2 spans were held" in over.reason
    (alone,) = TracesData.FromString(over.payload).resource_spans[0].scope_spans[0].spans
    assert alone.span_id == tools[0].get_span_context().span_id.to_bytes(8, "big")
    (late,) = memory.expire(62_000)  # the one from 2,000 ms: 60 s later
    assert late.source == "otlp_spans:0:8" and "within 60 s" in late.reason and len(memory) == 1
    (stopped,) = memory.expire(62_000, everything=True)
    assert stopped.source == "otlp_spans:1:9" and "stopped" in stopped.reason and memory.oldest_held() == {}


def test_a_model_call_instrumented_twice_counts_once_across_messages():
    agent = Agent()
    root, outer, inner = one_call_twice(agent)
    again = agent.span("chat gpt-4o", parent=root, start=100, attributes=USAGE)  # the same usage, another call
    again.end(end_time=T0 + 190 * MS)
    root.end(end_time=T0 + 200 * MS)
    memory = TraceMemory()
    results = [otlp_to_events(value, memory=memory, now_ms=1) for value in one_span_per_message(agent)]
    calls = [event for result in results for event in result.events if event["type"] == "llm_call"]
    assert [call["attributes"]["otel.span_id"] for call in calls] == [span_hex(inner), span_hex(again)]
    assert sum(result.skipped["nested_llm_call"] for result in results) == 1
    # the outer span first (another exporter's order): the inner one is the one skipped
    memory = TraceMemory()
    inner_first, outer_next, *rest = one_span_per_message(agent)
    results = [otlp_to_events(value, memory=memory, now_ms=1) for value in (outer_next, inner_first, *rest)]
    calls = [event for result in results for event in result.events if event["type"] == "llm_call"]
    assert [call["attributes"]["otel.span_id"] for call in calls] == [span_hex(outer), span_hex(again)]
