"""The same five agent runs driven through real instrumentation libraries, exported as the
Collector's Kafka exporter sends them (`otlp_proto` TracesData bytes on `otlp_spans`), and what
lands in `runs` and on `trackside.alerts` checked against what was driven.

Rows (one test each), every span made by the library, none built by hand:

- A: pydantic-ai's own OpenTelemetry instrumentation (the `Instrumentation` capability),
  its OpenAI chat model pointed at the fake server;
- B: opentelemetry-instrumentation-openai-v2 for the model calls, opentelemetry-util-genai's
  TelemetryHandler for the agent (`invoke_local_agent`) and its tools (`tool`), content
  capture on (OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=SPAN_ONLY): tool arguments
  are on the tool spans;
- C: the same with the libraries' defaults (no content): no tool arguments anywhere, so loops
  can only be told from token counts;
- D: OpenInference only: openinference-instrumentation-openai for the model calls, OITracer's
  `agent` and `tool` decorators for the rest (tool arguments in `input.value`);
- E: row A with openai-v2 also instrumenting the OpenAI client under pydantic-ai (both switched
  on, as happens): every model call has two chat spans, openai-v2's inside pydantic-ai's, and
  must count once.
- G: row D with OpenInference's GenAI dual-write on (`TraceConfig(enable_genai_semconv=True)`):
  each span carries both conventions and must count once, with the real arguments;
- F: row B with no `service.name` on the resource, every span in a message of its own (a
  Collector batches by time, not by trace), in the order they ended: children travel before
  their run's span, and only that span names the agent.

openai-v2 (2.4b0, the newest) imports `httpx` (openai 3 uses the httpx2 fork: its documented
`alias_httpx()` bridges that) and util-genai APIs that util-genai 1.2b0/1.3b0 removed: the dev
extra pins util-genai below 1.2; with a newer one, rows B, C and E fail saying so (`openai_v2()`).

The runs (tests/fake_openai.py): normal (2 model calls, 1 tool call), paginating (one tool, pages
1-3, results of other sizes: no loop), looping (one tool 5 times, the same arguments and result:
a loop), tool_fails (the tool raises, the model is told and answers) and model_fails (a tool
call, then HTTP 500: the run fails).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest
from confluent_kafka import Producer
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.fake_openai import (EXPECTED, MODEL, SCENARIOS, FakeOpenAI, ToolFailure, Tools, first_prompt,
                               tool_definition)
from tests.unit.test_otlp import to_traces_data
from tests.waiting import wait_until

pytestmark = pytest.mark.integration

CONTENT_ENV = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"
AGENT_VERSION = "1.4.0"
# What a row's loop alert rests on (streams/detect/README.md, "Loops"): the tool arguments
# where the spans carry them, else the model calls' token counts.
BASIS = {"A": "arguments", "B": "arguments", "C": "tokens", "D": "arguments", "E": "arguments", "F": "arguments",
         "G": "arguments"}


@pytest.fixture(scope="module")
def fake_openai():
    server = FakeOpenAI().start()
    yield server
    server.stop()
    assert server.unanswerable == [], "requests the fake server could not place in a scenario"


# ---------------------------------------------------------------------------------------
# Driving: one agent run per scenario, through one row's libraries


@dataclass
class Run:
    scenario: str
    spans: list[ReadableSpan] = field(default_factory=list)
    executed: list[tuple[str, dict, bool]] = field(default_factory=list)  # (tool, arguments, succeeded)
    raised: str = ""  # the exception the agent run ended with, if any

    @property
    def trace_id(self) -> str:
        """The run's trace: its one root span's, shared by all its spans (Trackside's run_id)."""
        roots = [span for span in self.spans if span.parent is None]
        assert len(roots) == 1, f"{self.scenario}: {len(roots)} root spans"
        assert {span.context.trace_id for span in self.spans} == {roots[0].context.trace_id}, self.scenario
        return format(roots[0].context.trace_id, "032x")


class Row:
    """One row's TracerProvider (in-memory exporter, a resource naming the agent) and its runs."""

    def __init__(self, row: str, service_name: bool = True) -> None:
        self.row = row
        self.agent = f"support-bot-{row.lower()}"
        self.exporter = InMemorySpanExporter()
        named = {"service.name": self.agent} if service_name else {}  # else the SDK's unknown_service
        self.provider = TracerProvider(resource=Resource.create({**named, "service.version": AGENT_VERSION}))
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.runs: list[Run] = []

    def prompts(self):
        """(scenario, first prompt) of each run to drive, in order."""
        return [(scenario, first_prompt(self.row, scenario)) for scenario in SCENARIOS]

    @contextmanager
    def recording(self, scenario: str, tools: Tools):
        """One run: its spans are those that finished while it went, its tools those executed;
        the exception it ended with is recorded (the model_fails run ends so), not raised."""
        run = Run(scenario)
        spans, executed = len(self.exporter.get_finished_spans()), len(tools.executed)
        try:
            yield run
        except Exception as error:  # noqa: BLE001 - how the run ended is what was driven
            run.raised = type(error).__name__
        finally:
            run.spans = list(self.exporter.get_finished_spans()[spans:])
            run.executed = tools.executed[executed:]
            self.runs.append(run)


def chat_loop(client, prompt: str, execute: Callable[[str, dict, str], str]) -> str:
    """A plain tool-calling agent on the OpenAI client: ask, run the tools asked for (a tool's
    failure is told to the model), until the model answers in text."""
    messages: list[dict] = [{"role": "user", "content": prompt}]
    tools = [tool_definition(name) for name in ("lookup_order", "list_orders", "ticket_status", "fetch_invoice")]
    for _ in range(12):
        message = client.chat.completions.create(model=MODEL, messages=messages, tools=tools).choices[0].message
        if not message.tool_calls:
            return message.content
        messages.append(message.model_dump(exclude_none=True))
        for call in message.tool_calls:
            try:
                content = execute(call.function.name, json.loads(call.function.arguments), call.id)
            except ToolFailure as failure:
                content = f"error: {failure}"
            messages.append({"role": "tool", "tool_call_id": call.id, "content": content})
    raise AssertionError(f"{prompt!r}: the model never answered in text")


def drive_pydantic_ai(row: Row, fake: FakeOpenAI, client_instrumented: bool = False) -> list[Run]:
    """Row A; with `client_instrumented` (row E) openai-v2 instruments the OpenAI client under
    pydantic-ai too, as when both are switched on: each model call is instrumented twice."""
    if client_instrumented:
        instrumentor = openai_v2().OpenAIInstrumentor()
        instrumentor.instrument(tracer_provider=row.provider)
        try:
            return drive_pydantic_ai(row, fake)
        finally:
            instrumentor.uninstrument()
    from openai import AsyncOpenAI
    from pydantic_ai import Agent, ModelRetry
    from pydantic_ai.capabilities import Instrumentation
    from pydantic_ai.models.instrumented import InstrumentationSettings
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    tools = Tools(failure=ModelRetry)  # a pydantic-ai tool that failed tells the model so with ModelRetry

    async def main() -> list[Run]:
        client = AsyncOpenAI(base_url=fake.base_url, api_key="test-key", max_retries=0)
        agent = Agent(
            OpenAIChatModel(MODEL, provider=OpenAIProvider(openai_client=client)), name=row.agent,
            tools=tools.functions(),
            capabilities=[Instrumentation(settings=InstrumentationSettings(tracer_provider=row.provider))],
        )
        try:
            for scenario, prompt in row.prompts():
                with row.recording(scenario, tools):
                    await agent.run(prompt)
        finally:
            await client.close()
        return row.runs

    return asyncio.run(main())


def openai_v2():
    """opentelemetry-instrumentation-openai-v2, or the test fails saying why it cannot be used."""
    if importlib.util.find_spec("httpx") is None:
        # openai 3 moved to the httpx2 fork; openai-v2 (2.4b0) still imports httpx. httpx2's
        # documented bridge for applications: `import httpx` resolves to httpx2.
        import httpx2

        httpx2.alias_httpx()
    try:
        from opentelemetry.instrumentation import openai_v2
    except ImportError as error:
        unusable = error
    else:
        return openai_v2
    from importlib.metadata import version

    pytest.fail(
        f"opentelemetry-instrumentation-openai-v2 {version('opentelemetry-instrumentation-openai-v2')} cannot be "
        f"imported with opentelemetry-util-genai {version('opentelemetry-util-genai')}: {unusable}. It needs "
        "opentelemetry.util.genai.instruments (gone from util-genai since 1.2b0) and TelemetryHandler."
        "start_inference / stop_llm / fail_llm (gone in 1.3b0): opentelemetry-util-genai 1.1b0 is the newest "
        "that works with it", pytrace=False)


def drive_genai(row: Row, fake: FakeOpenAI) -> list[Run]:
    import openai

    v2 = openai_v2()
    from opentelemetry.util.genai.handler import TelemetryHandler

    instrumentor = v2.OpenAIInstrumentor()
    instrumentor.instrument(tracer_provider=row.provider)  # reads the content mode now
    try:
        handler = TelemetryHandler(tracer_provider=row.provider)
        client = openai.OpenAI(base_url=fake.base_url, api_key="test-key", max_retries=0)
        tools = Tools()

        def execute(name: str, arguments: dict, call_id: str) -> str:
            with handler.tool(name, tool_type="function") as invocation:
                invocation.tool_call_id = call_id
                if handler.should_capture_content():
                    invocation.arguments = arguments
                result = tools.call(name, arguments)
                if handler.should_capture_content():
                    invocation.tool_result = result
                return result

        for scenario, prompt in row.prompts():
            with row.recording(scenario, tools), handler.invoke_local_agent(agent_name=row.agent, request_model=MODEL):
                chat_loop(client, prompt, execute)
        client.close()
        return row.runs
    finally:
        instrumentor.uninstrument()


def drive_openinference(row: Row, fake: FakeOpenAI, dual_write: bool = False) -> list[Run]:
    """Row D; with `dual_write` (row G) OpenInference also writes the GenAI conventions."""
    import openai
    from openinference.instrumentation import OITracer, TraceConfig
    from openinference.instrumentation.openai import OpenAIInstrumentor

    config = TraceConfig(enable_genai_semconv=dual_write)
    instrumentor = OpenAIInstrumentor()
    instrumentor.instrument(tracer_provider=row.provider, config=config)
    try:
        tracer = OITracer(row.provider.get_tracer(__name__), config=config)
        client = openai.OpenAI(base_url=fake.base_url, api_key="test-key", max_retries=0)
        tools = Tools()
        traced = {function.__name__: tracer.tool(name=function.__name__)(function) for function in tools.functions()}

        @tracer.agent(name=row.agent)
        def agent(prompt: str) -> str:
            return chat_loop(client, prompt, lambda name, arguments, call_id: traced[name](**arguments))

        for scenario, prompt in row.prompts():
            with row.recording(scenario, tools):
                agent(prompt)
        client.close()
        return row.runs
    finally:
        instrumentor.uninstrument()


# ---------------------------------------------------------------------------------------
# What the spans carry (a check that each row is what it says), and what Trackside stored


def _attributes(runs: list[Run], kind: Callable[[ReadableSpan], bool]) -> list[dict]:
    return [dict(span.attributes) for run in runs for span in run.spans if kind(span)]


def _genai_op(op: str) -> Callable[[ReadableSpan], bool]:
    return lambda span: span.attributes.get("gen_ai.operation.name") == op


def _openinference(kind: str) -> Callable[[ReadableSpan], bool]:
    return lambda span: span.attributes.get("openinference.span.kind") == kind


def check_spans(row: str, runs: list[Run]) -> None:
    driven_tools = sum(len(run.executed) for run in runs)
    driven_llm = sum(EXPECTED[run.scenario].llm_calls for run in runs)
    if row in ("D", "G"):
        tools, llms = _attributes(runs, _openinference("TOOL")), _attributes(runs, _openinference("LLM"))
        assert len(tools) == driven_tools and len(llms) == driven_llm
        assert all("input.value" in attributes for attributes in tools), "OpenInference tool spans carry their input"
        dual = [attributes for attributes in tools + llms if "gen_ai.operation.name" in attributes]
        assert len(dual) == (len(tools) + len(llms) if row == "G" else 0), "GenAI dual-written only in row G"
        return
    tools, llms = _attributes(runs, _genai_op("execute_tool")), _attributes(runs, _genai_op("chat"))
    if row == "E":  # every model call twice: openai-v2's chat span inside pydantic-ai's
        chats = {span.context.span_id for run in runs for span in run.spans if _genai_op("chat")(span)}
        inner = [span for run in runs for span in run.spans
                 if _genai_op("chat")(span) and span.parent is not None and span.parent.span_id in chats]
        assert len(llms) == 2 * driven_llm and len(inner) == driven_llm
    else:
        assert len(llms) == driven_llm
    assert len(tools) == driven_tools
    with_arguments = [attributes for attributes in tools if "gen_ai.tool.call.arguments" in attributes]
    if row == "C":
        assert with_arguments == [], "content capture is off by default: no tool arguments"
    else:
        assert len(with_arguments) == len(tools), "tool arguments are on every tool span"


def produce(stack, runs: list[Run], span_per_message: bool = False) -> None:
    """The row's spans as `otlp_proto` messages, as the Collector's Kafka exporter sends them:
    all in one, or each in its own (in the order they ended)."""
    spans = [span for run in runs for span in run.spans]
    producer = Producer({"bootstrap.servers": f"127.0.0.1:{stack.port}"})
    for part in ([[span] for span in spans] if span_per_message else [spans]):
        producer.produce("otlp_spans", value=to_traces_data(part).SerializeToString())
    assert producer.flush(10) == 0


COLUMNS = ("agent_id", "agent_version", "outcome", "llm_calls", "tool_calls", "tool_errors", "llm_errors",
           "input_tokens", "output_tokens", "loop_detected")


def driven(row: Row, run: Run, fake: FakeOpenAI) -> dict:
    """The run's row as Trackside should store it: counted from what the fake server answered and
    the tools executed, not from the spans."""
    calls = fake.calls_of(row.row, run.scenario)
    return {
        "agent_id": row.agent, "agent_version": AGENT_VERSION,
        "outcome": "failure" if run.raised else "success",
        "llm_calls": len(calls), "tool_calls": len(run.executed),
        "tool_errors": sum(not ok for _, _, ok in run.executed),
        "llm_errors": sum(call.status != 200 for call in calls),
        "input_tokens": sum(call.prompt_tokens for call in calls),
        "output_tokens": sum(call.completion_tokens for call in calls),
        "loop_detected": run.scenario == "looping",
    }


def scripted(run: Run) -> dict:
    """What the scenario's script says was driven (so a run that went otherwise fails here)."""
    expected = EXPECTED[run.scenario]
    return {"llm_calls": expected.llm_calls, "tool_calls": expected.tool_calls,
            "tool_errors": expected.tool_errors, "llm_errors": expected.llm_errors,
            "outcome": expected.outcome}


def _quietly(observe: Callable[[], object], done: Callable[[object], bool], timeout: float, what: str):
    """Wait for `done` like wait_until, but return what was seen last instead of failing: the
    comparison after it says, run by run, what is missing."""
    try:
        return wait_until(observe, timeout, what, done=done, interval=0.3)
    except AssertionError:
        return observe()


def check_row(stack, fake: FakeOpenAI, row: Row, runs: list[Run], span_per_message: bool = False) -> None:
    assert [run.scenario for run in runs] == list(SCENARIOS)
    ids = {run.trace_id: run for run in runs}
    assert len(ids) == len(runs), "one trace per run"
    for run in runs:  # the runs went as scripted
        want = driven(row, run, fake)
        assert {key: want[key] for key in scripted(run)} == scripted(run), run.scenario
        assert bool(run.raised) == (run.scenario == "model_fails"), (run.scenario, run.raised)
    check_spans(row.row, runs)

    produce(stack, runs, span_per_message)
    expected = {run.scenario: driven(row, run, fake) for run in runs}

    def stored() -> dict:
        found = {stored_row["run_id"]: stored_row for stored_row in stack.query(
            f"SELECT run_id, {', '.join(COLUMNS)} FROM runs WHERE run_id IN {{ids:Array(String)}}", {"ids": list(ids)})}
        return {run.scenario: ({column: _plain(found[trace][column]) for column in COLUMNS}
                               if trace in found else "no run stored") for trace, run in ids.items()}

    # Waited for until they are what was driven (a run's row is replaced as more of its events
    # are assembled); what differs still after the wait is the failure, run by run.
    actual = _quietly(stored, lambda seen: seen == expected, 30, f"the runs of row {row.row}")
    # The loop alerts of the row's runs or agent: only the looping run's, on the row's basis.
    looping = next(trace for trace, run in ids.items() if run.scenario == "looping")
    alerts = _quietly(lambda: [alert for alert in stack.on_topic("trackside.alerts")
                               if alert["kind"] == "loop" and alert["status"] == "firing"
                               and (alert["run_id"] in ids or alert["agent_id"] == row.agent)],
                      lambda seen: any(alert["run_id"] == looping for alert in seen), 30, "the loop alert")
    expected["loop alerts"] = [("looping", BASIS[row.row])]
    actual["loop alerts"] = sorted((ids[alert["run_id"]].scenario if alert["run_id"] in ids else alert["run_id"],
                                    alert["evidence"]["basis"]) for alert in alerts)
    # error types as class names, never a class's repr (openai-v2 writes `<class '...'>`)
    expected["error types as written"] = []
    actual["error types as written"] = [row["error_type"] for row in stack.query(
        "SELECT DISTINCT error_type FROM events WHERE run_id IN {ids:Array(String)} AND error_type LIKE '<class%'",
        {"ids": list(ids)})]
    expected["runs of the agent"] = len(runs)  # none split in two, none made up
    actual["runs of the agent"] = stack.count("SELECT count() FROM runs WHERE agent_id = {agent:String}",
                                              {"agent": row.agent})
    assert actual == expected, f"row {row.row} ({row.agent}), stored vs driven: " + differences(actual, expected)


def differences(actual: dict, expected: dict) -> str:
    out = []
    for key, want in expected.items():
        got = actual.get(key)
        if isinstance(got, dict) and isinstance(want, dict):
            out += [f"{key}: {column} {got.get(column)!r}, driven {value!r}"
                    for column, value in want.items() if got.get(column) != value]
        elif got != want:
            out.append(f"{key}: {got!r}, driven {want!r}")
    return "; ".join(out)


def _plain(value):
    """ClickHouse's JSON quotes 64-bit integers and writes booleans as they are."""
    return int(value) if isinstance(value, str) and value.isdigit() else value


# ---------------------------------------------------------------------------------------
# The rows


@pytest.mark.parametrize("row_name, client_instrumented", [("A", False), ("E", True)],
                         ids=["pydantic_ai", "pydantic_ai_over_openai_v2"])
def test_pydantic_ai_instrumentation(stack, fake_openai, monkeypatch, row_name, client_instrumented):
    monkeypatch.delenv(CONTENT_ENV, raising=False)  # openai-v2's default
    row = Row(row_name)
    check_row(stack, fake_openai, row, drive_pydantic_ai(row, fake_openai, client_instrumented))


@pytest.mark.parametrize("row_name, content, apart", [("B", True, False), ("C", False, False), ("F", True, True)],
                         ids=["openai_v2_util_genai_content", "openai_v2_util_genai_defaults",
                              "openai_v2_util_genai_span_per_message_no_service"])
def test_openai_v2_with_util_genai(stack, fake_openai, monkeypatch, row_name, content, apart):
    if content:
        monkeypatch.setenv(CONTENT_ENV, "SPAN_ONLY")
    else:
        monkeypatch.delenv(CONTENT_ENV, raising=False)
    row = Row(row_name, service_name=not apart)
    check_row(stack, fake_openai, row, drive_genai(row, fake_openai), span_per_message=apart)


@pytest.mark.parametrize("row_name, dual_write", [("D", False), ("G", True)],
                         ids=["openinference_only", "openinference_genai_dual_write"])
def test_openinference(stack, fake_openai, row_name, dual_write):
    row = Row(row_name)
    check_row(stack, fake_openai, row, drive_openinference(row, fake_openai, dual_write))
