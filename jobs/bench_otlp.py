"""How fast the OTLP mapping turns spans into agent events, against decoding the same messages alone.

    python -m jobs.bench_otlp [--runs 4000] [--spans-per-message 200] [--repeat 3]

A simulated fleet's runs become OpenTelemetry GenAI spans (an `invoke_agent` span per run, a
`chat` span per model call, an `execute_tool` span per tool call, with the attributes the
libraries write) in `otlp_proto` and `otlp_json` messages of N spans, as the Collector's Kafka
exporter sends them. Timed per encoding, best of `--repeat` passes: decoding alone
(`TracesData.FromString`, `orjson.loads`) and the whole mapping as the ingest stage runs it
(`otlp_to_events` with normalised rows and a `TraceMemory` across the messages); spans per
second of each, and the mapping's share of the decode's rate.
"""

from __future__ import annotations

import argparse
import sys
import time

import orjson
from google.protobuf import json_format
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status, TracesData
from rich.console import Console
from rich.table import Table

from jobs.simulate import FleetConfig, simulate
from streams.ingest.otlp import TraceMemory, otlp_to_events

MS = 1_000_000


def _value(value) -> AnyValue:
    if isinstance(value, bool):
        return AnyValue(bool_value=value)
    if isinstance(value, int):
        return AnyValue(int_value=value)
    if isinstance(value, float):
        return AnyValue(double_value=value)
    return AnyValue(string_value=str(value))


def _attributes(values: dict) -> list[KeyValue]:
    return [KeyValue(key=key, value=_value(value)) for key, value in values.items() if value is not None]


def fleet_spans(runs: int) -> list[tuple[dict, Span]]:
    """(resource attributes, span) of every run of a simulated fleet, in event order per run."""
    by_run: dict[str, list[dict]] = {}
    for event in simulate(FleetConfig(seed=11, runs=runs)):
        by_run.setdefault(event["run_id"], []).append(event)
    out = []
    for number, (run_id, events) in enumerate(by_run.items()):
        trace_id = number.to_bytes(8, "big") + bytes.fromhex(run_id.replace("-", "")[:16].ljust(16, "0"))
        root_id = (number * 1000 + 1).to_bytes(8, "big")
        first, last = events[0], events[-1]
        resource = {"service.name": first["agent_id"], "service.version": first["agent_version"],
                    "deployment.environment.name": "prod"}
        for n, event in enumerate(events[1:-1], start=2):
            start = event["ts"] * MS
            end = start + int(event.get("latency_ms") or 1) * MS
            span = Span(trace_id=trace_id, span_id=(number * 1000 + n).to_bytes(8, "big"), parent_span_id=root_id,
                        start_time_unix_nano=start, end_time_unix_nano=end, kind=3)
            if event["type"] == "llm_call":
                span.name = f"chat {event['model']}"
                span.attributes.extend(_attributes({
                    "gen_ai.operation.name": "chat", "gen_ai.request.model": event["model"],
                    "gen_ai.provider.name": event["provider"], "gen_ai.usage.input_tokens": event["input_tokens"],
                    "gen_ai.usage.output_tokens": event["output_tokens"],
                    "gen_ai.response.finish_reasons": "tool_calls", "server.address": "api.example.com"}))
            elif event["type"] == "tool_call":
                span.name = f"execute_tool {event['tool']}"
                span.attributes.extend(_attributes({
                    "gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": event["tool"],
                    "gen_ai.tool.call.id": f"call_{n}", "gen_ai.tool.type": "function",
                    "gen_ai.tool.call.arguments": orjson.dumps(event.get("args") or {}).decode()}))
            else:
                continue
            if event.get("status", "ok") != "ok":
                span.status.CopyFrom(Status(code=2, message=event.get("error_message", "")))
                span.attributes.extend(_attributes({"error.type": event.get("error_type") or "error"}))
            out.append((resource, span))
        root = Span(trace_id=trace_id, span_id=root_id, name=f"invoke_agent {first['agent_id']}",
                    start_time_unix_nano=first["ts"] * MS, end_time_unix_nano=max(last["ts"], first["ts"] + 1) * MS,
                    kind=1)
        root.attributes.extend(_attributes({
            "gen_ai.operation.name": "invoke_agent", "gen_ai.agent.id": first["agent_id"],
            "gen_ai.agent.version": first["agent_version"], "gen_ai.conversation.id": first.get("session_id")}))
        out.append((resource, root))
    return out


def messages(spans: list[tuple[dict, Span]], per_message: int) -> list[bytes]:
    """Spans in messages of `per_message`, grouped by resource within a message, as exporters do."""
    out = []
    for at in range(0, len(spans), per_message):
        traces = TracesData()
        groups: dict[tuple, object] = {}
        for resource, span in spans[at:at + per_message]:
            key = tuple(sorted(resource.items()))
            if key not in groups:
                resource_spans = traces.resource_spans.add(resource=Resource(attributes=_attributes(resource)))
                groups[key] = resource_spans.scope_spans.add()
            groups[key].spans.append(span)
        out.append(traces.SerializeToString())
    return out


def map_all(values: list[bytes], encoding: str) -> None:
    memory = TraceMemory()
    for n, value in enumerate(values):
        otlp_to_events(value, encoding, normalise=True, memory=memory, source=f"otlp_spans:0:{n}", now_ms=n)


def _best(work, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        began = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - began)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=4000)
    parser.add_argument("--spans-per-message", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    spans = fleet_spans(args.runs)
    proto = messages(spans, args.spans_per_message)
    as_json = [orjson.dumps(json_format.MessageToDict(TracesData.FromString(value))) for value in proto]
    events = sum(len(otlp_to_events(value).events) for value in proto)
    table = Table(title=f"OTLP mapping: {len(spans):,} spans of {args.runs:,} runs in messages of "
                        f"{args.spans_per_message} ({events:,} events), best of {args.repeat}")
    for column in ("encoding", "decode alone (spans/s)", "whole mapping (spans/s)", "mapping / decode"):
        table.add_column(column, justify="right")
    for name, values, decode in (("otlp_proto", proto, TracesData.FromString), ("otlp_json", as_json, orjson.loads)):
        decoded = _best(lambda: [decode(value) for value in values], args.repeat)
        # as the ingest stage maps them: with a TraceMemory across the messages (a fresh one a pass)
        mapped = _best(lambda: map_all(values, name), args.repeat)
        table.add_row(name, f"{len(spans) / decoded:,.0f}", f"{len(spans) / mapped:,.0f}", f"{decoded / mapped:.3f}")
    Console().print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
