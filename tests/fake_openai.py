"""A fake OpenAI-compatible chat server for the instrumentation tests: deterministic agent runs.

POST /v1/chat/completions (non-streaming). The conversation's first user message names the run:
`[<row>/<scenario>] ...`; the next step of the scenario is decided by how many tool results the
conversation already holds. Each reply reports `usage` as a pure function of what was sent and
what is answered, so the same call made again on the same conversation growth is counted alike:

- prompt_tokens = (characters of all request messages, as compact sorted JSON) // 4 + 10 per message
- completion_tokens = (characters of the reply: its text, or the tool call's name and
  arguments as compact sorted JSON) // 4 + 1

Every call the server answers is recorded (`calls`), so a test can sum what the server
reported for a run and compare it with what Trackside stored.

A model answer takes time: the server answers in a later millisecond than the one its request
arrived in (it waits for the clock to tick, never a fixed time), so no two model calls of a run
start in the same millisecond, the resolution of Trackside's event times.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests.waiting import wait_until

MODEL = "gpt-4o-mini"
_TAG = re.compile(r"^\[([A-Za-z0-9_-]+)/([a-z_]+)\]")


def compact(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def prompt_tokens(messages: list[dict]) -> int:
    return sum(len(compact(message)) for message in messages) // 4 + 10 * len(messages)


def completion_tokens(reply: dict) -> int:
    """`reply` is {"content": text} or {"tool": name, "arguments": {...}}."""
    return len(compact(reply)) // 4 + 1


# ---------------------------------------------------------------------------------------
# The scenarios: what the model answers at each turn, and what the tools return.

# The tool each scenario calls, and the arguments of its calls in order.
SCENARIOS: dict[str, dict] = {
    # 2 model calls, 1 tool call, success
    "normal": {"prompt": "Where is my order A-1001?", "tool": "lookup_order",
               "calls": [{"order_id": "A-1001"}], "final": "Order A-1001 shipped on Monday."},
    # 3 calls of one tool with other arguments (pages 1, 2, 3) whose results differ in size
    "paginating": {"prompt": "List all my orders.", "tool": "list_orders",
                   "calls": [{"page": 1}, {"page": 2}, {"page": 3}], "final": "You have 21 orders."},
    # 5 calls of one tool with the same arguments, the same result each time
    "looping": {"prompt": "Is ticket T-7 resolved yet?", "tool": "ticket_status",
                "calls": [{"ticket_id": "T-7"}] * 5, "final": "Ticket T-7 is still pending."},
    # the tool raises; the model is told and answers
    "tool_fails": {"prompt": "Send me invoice INV-9.", "tool": "fetch_invoice",
                   "calls": [{"invoice_id": "INV-9"}], "final": "Sorry, the invoice service is down."},
    # one tool call, then the model's server answers HTTP 500
    "model_fails": {"prompt": "Cancel order A-2002.", "tool": "lookup_order",
                    "calls": [{"order_id": "A-2002"}], "final": None},
}

@dataclass(frozen=True)
class Expected:
    """What a scenario drives, as Trackside should count it."""

    llm_calls: int
    tool_calls: int
    tool_errors: int
    llm_errors: int
    outcome: str
    loop: bool


EXPECTED = {
    "normal": Expected(llm_calls=2, tool_calls=1, tool_errors=0, llm_errors=0, outcome="success", loop=False),
    "paginating": Expected(llm_calls=4, tool_calls=3, tool_errors=0, llm_errors=0, outcome="success", loop=False),
    "looping": Expected(llm_calls=6, tool_calls=5, tool_errors=0, llm_errors=0, outcome="success", loop=True),
    "tool_fails": Expected(llm_calls=2, tool_calls=1, tool_errors=1, llm_errors=0, outcome="success", loop=False),
    "model_fails": Expected(llm_calls=2, tool_calls=1, tool_errors=0, llm_errors=1, outcome="failure", loop=False),
}


class ToolFailure(RuntimeError):
    """What the failing tool raises."""


def run_tool(name: str, arguments: dict) -> str:
    """The tools, deterministic: the text a tool returns (or ToolFailure)."""
    if name == "lookup_order":
        return compact({"order_id": arguments["order_id"], "status": "shipped", "carrier": "DHL"})
    if name == "list_orders":
        sizes = {1: 12, 2: 7, 3: 2}  # pages of other sizes: each result grows the conversation differently
        page = int(arguments["page"])
        first = sum(size for number, size in sizes.items() if number < page)
        return compact({"page": page, "orders": [f"A-{1000 + first + i}" for i in range(sizes[page])]})
    if name == "ticket_status":
        return compact({"ticket_id": arguments["ticket_id"], "status": "pending"})
    if name == "fetch_invoice":
        raise ToolFailure("invoice service unavailable")
    raise KeyError(name)


class Tools:
    """The scenarios' tools as functions with real signatures (for libraries that read them);
    every execution is recorded in `executed` as (tool, arguments, succeeded). `failure`, if
    given, turns the failing tool's ToolFailure into the exception a framework expects from a
    tool that failed (pydantic-ai's ModelRetry)."""

    def __init__(self, failure: Callable[[str], BaseException] | None = None) -> None:
        self.executed: list[tuple[str, dict, bool]] = []
        self._failure = failure

    def call(self, name: str, arguments: dict) -> str:
        try:
            result = run_tool(name, arguments)
        except ToolFailure as failure:
            self.executed.append((name, arguments, False))
            if self._failure is not None:
                raise self._failure(str(failure)) from failure
            raise
        self.executed.append((name, arguments, True))
        return result

    def functions(self) -> list[Callable[..., str]]:
        call = self.call

        def lookup_order(order_id: str) -> str:
            """Look up one order."""
            return call("lookup_order", {"order_id": order_id})

        def list_orders(page: int) -> str:
            """List the customer's orders, one page at a time."""
            return call("list_orders", {"page": page})

        def ticket_status(ticket_id: str) -> str:
            """The status of a support ticket."""
            return call("ticket_status", {"ticket_id": ticket_id})

        def fetch_invoice(invoice_id: str) -> str:
            """Fetch an invoice."""
            return call("fetch_invoice", {"invoice_id": invoice_id})

        return [lookup_order, list_orders, ticket_status, fetch_invoice]


TOOL_DESCRIPTIONS = {
    "lookup_order": ("Look up one order.", {"order_id": {"type": "string"}}),
    "list_orders": ("List the customer's orders, one page at a time.", {"page": {"type": "integer"}}),
    "ticket_status": ("The status of a support ticket.", {"ticket_id": {"type": "string"}}),
    "fetch_invoice": ("Fetch an invoice.", {"invoice_id": {"type": "string"}}),
}


def tool_definition(name: str) -> dict:
    """The tool in OpenAI's `tools` format, for clients that send tool definitions themselves."""
    description, properties = TOOL_DESCRIPTIONS[name]
    return {"type": "function", "function": {
        "name": name, "description": description,
        "parameters": {"type": "object", "properties": properties, "required": list(properties),
                       "additionalProperties": False}}}


def first_prompt(row: str, scenario: str) -> str:
    return f"[{row}/{scenario}] {SCENARIOS[scenario]['prompt']}"


# ---------------------------------------------------------------------------------------
# The server


@dataclass(frozen=True)
class Call:
    row: str
    scenario: str
    status: int  # HTTP status answered
    prompt_tokens: int
    completion_tokens: int


class FakeOpenAI:
    """Start with `start()`, point a client at `base_url`, `stop()` when done."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.unanswerable: list[str] = []  # requests it could not place (a test bug, asserted empty)
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def do_POST(self) -> None:
                arrived_ms = time.time_ns() // 1_000_000
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                status, answer = fake._answer(self.path, body)
                # A model answer takes time: answer in a later millisecond than the request came in.
                wait_until(lambda: time.time_ns() // 1_000_000 > arrived_ms, 1, "the clock to tick", interval=0.0002)
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-openai", daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def start(self) -> FakeOpenAI:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)

    def calls_of(self, row: str, scenario: str) -> list[Call]:
        with self._lock:
            return [call for call in self.calls if (call.row, call.scenario) == (row, scenario)]

    def _record(self, call: Call) -> None:
        with self._lock:
            self.calls.append(call)

    def _answer(self, path: str, body: dict) -> tuple[int, dict]:
        messages = body.get("messages") or []
        first_user = next((m for m in messages if m.get("role") == "user"), None)
        text = _text(first_user.get("content")) if first_user else ""
        tag = _TAG.match(text)
        if path.rstrip("/") != "/v1/chat/completions" or tag is None or tag.group(2) not in SCENARIOS:
            with self._lock:
                self.unanswerable.append(f"{path}: {text[:80]!r}")
            return 404, {"error": {"message": "no such scenario", "type": "invalid_request_error"}}
        row, scenario = tag.groups()
        script = SCENARIOS[scenario]
        turn = sum(1 for message in messages if message.get("role") == "tool")
        prompt = prompt_tokens(messages)
        if turn < len(script["calls"]):
            reply = {"tool": script["tool"], "arguments": script["calls"][turn]}
            message = {"role": "assistant", "content": None, "tool_calls": [{
                "id": f"call_{row}_{scenario}_{turn:03d}", "type": "function",
                "function": {"name": script["tool"], "arguments": compact(script["calls"][turn])}}]}
            finish = "tool_calls"
        elif script["final"] is None:
            self._record(Call(row, scenario, 500, 0, 0))
            return 500, {"error": {"message": "The server had an error while processing your request.",
                                   "type": "server_error", "code": None, "param": None}}
        else:
            reply = {"content": script["final"]}
            message = {"role": "assistant", "content": script["final"]}
            finish = "stop"
        completion = completion_tokens(reply)
        self._record(Call(row, scenario, 200, prompt, completion))
        return 200, {
            "id": f"chatcmpl-{row}-{scenario}-{turn}", "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model") or MODEL, "system_fingerprint": "fp_fake",
            "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                      "total_tokens": prompt + completion},
        }


def _text(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return ""
