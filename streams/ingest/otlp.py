"""OTLP traces -> agent events: one `otlp_spans` message (SPEC §3) in, agent events (SPEC §4) out.
The mapping, span by span and field by field: streams/ingest/README.md, "The OTLP mapping"."""

from __future__ import annotations

import base64
import binascii
import math
import re
from collections import Counter, OrderedDict
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import orjson
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan
from opentelemetry.proto.trace.v1.trace_pb2 import TracesData

from streams.errors import ConfigError, TracksideError
from streams.contracts.events import MAX_COUNT, MAX_TEXT_CHARS, OUTCOMES, InvalidEvent, args_hash, validate

ENCODINGS = ("otlp_proto", "otlp_json")
DEFAULT_MAX_BYTES = 16 << 20

RUN_OPERATIONS = frozenset({"invoke_agent"})
LLM_OPERATIONS = frozenset({"chat", "text_completion", "generate_content"})
TOOL_OPERATIONS = frozenset({"execute_tool"})
# GenAI operations of the conventions that are no Trackside event: skipped, counted by name.
UNMAPPED_OPERATIONS = frozenset({"embeddings", "retrieval", "create_agent", "invoke_workflow"})

# OpenInference (Arize Phoenix's conventions): the span kind -> the GenAI operation it maps as.
# A CHAIN is the run only at a trace's root (a workflow with no AGENT span); else it is skipped.
OPENINFERENCE_KIND = "openinference.span.kind"
OPENINFERENCE_OPERATIONS = {
    "AGENT": "invoke_agent", "LLM": "chat", "TOOL": "execute_tool",
    "RETRIEVER": "retrieval", "EMBEDDING": "embeddings",
}
# An exception class written as Python's repr (`<class 'openai.InternalServerError'>`).
_CLASS_REPR = re.compile(r"<class '([A-Za-z_][\w.]*)'>")

MAX_ATTRIBUTES = 64
MAX_ATTRIBUTE_CHARS = 1024
MAX_ATTRIBUTE_ITEMS = 32
MAX_EVALUATIONS = 8
MAX_ANCESTORS = 256

STATUS_UNSET, STATUS_OK, STATUS_ERROR = 0, 1, 2
_STATUS_NAMES = {"STATUS_CODE_UNSET": 0, "STATUS_CODE_OK": 1, "STATUS_CODE_ERROR": 2}

EVALUATION_EVENT = "gen_ai.evaluation.result"
EXCEPTION_EVENT = "exception"
_WANTED_EVENTS = frozenset({EVALUATION_EVENT, EXCEPTION_EVENT})

# gen_ai.evaluation.score.label -> outcome; other labels do not decide.
EVALUATION_LABELS = {
    **dict.fromkeys(
        ("pass", "passed", "success", "succeeded", "successful", "correct", "resolved", "completed",
         "complete", "true", "yes"), "success"),
    **dict.fromkeys(("fail", "failed", "failure", "incorrect", "unresolved", "false", "no"), "failure"),
    "escalated": "escalated",
    **dict.fromkeys(("aborted", "cancelled", "canceled"), "aborted"),
}

# Attributes that became event fields: not repeated in `attributes`.
_MAPPED = frozenset({
    "gen_ai.operation.name", "gen_ai.agent.id", "gen_ai.agent.version", "gen_ai.conversation.id",
    "gen_ai.request.model", "gen_ai.provider.name", "gen_ai.system",
    "gen_ai.usage.input_tokens", "gen_ai.usage.prompt_tokens", "gen_ai.usage.output_tokens",
    "gen_ai.usage.completion_tokens", "gen_ai.usage.cache_read.input_tokens",
    "gen_ai.tool.name", "gen_ai.tool.call.arguments", "error.type",
    "trackside.outcome", "trackside.task_id", "trackside.tenant",
    OPENINFERENCE_KIND, "llm.model_name", "llm.provider", "llm.system", "llm.token_count.prompt",
    "llm.token_count.completion", "llm.token_count.prompt_details.cache_read", "tool.name", "session.id",
    "agent.name",
})
# Message content: large and sensitive, never stored.
_CONTENT = frozenset({
    "gen_ai.input.messages", "gen_ai.output.messages", "gen_ai.system_instructions",
    "gen_ai.tool.definitions", "gen_ai.tool.call.result", "gen_ai.prompt", "gen_ai.completion",
    "llm.prompts", "tool.parameters", "tool.description",
})
_CONTENT_PREFIXES = ("gen_ai.prompt.", "gen_ai.completion.", "gen_ai.retrieval.", "input.", "output.",
                     "llm.input_messages", "llm.output_messages", "llm.prompt_template", "llm.tools",
                     "retrieval.documents", "reranker.", "embedding.")

_ZERO_TRACE, _ZERO_SPAN = bytes(16), bytes(8)
_TYPE_RANK = {"run_start": 0, "llm_call": 1, "tool_call": 1, "run_end": 2}


class InvalidOtlp(TracksideError):
    """A message that is not a readable OTLP TracesData; `str()` is the reason for the DLQ."""


class Rejection(NamedTuple):
    where: str  # <traceId>:<spanId> in hex, or the span's position in the message
    reason: str


class GivenUp(NamedTuple):
    """Spans of an earlier message that were held (TraceMemory) and are rejected now."""

    where: str  # the trace id (of the first span)
    reason: str
    source: str  # the message they came in: topic:partition:offset
    payload: bytes  # the spans as a message of their own, in the encoding they came in


class Mapped(NamedTuple):
    events: list[dict]
    rejected: list[Rejection]
    skipped: Counter  # reason -> spans
    held: int = 0  # spans of this message held for their run's identity (TraceMemory)
    given_up: list[GivenUp] = []  # held spans of earlier messages rejected now

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())


class _Reject(Exception):
    """One span cannot be mapped; the message is the reason."""


class _NoIdentity(_Reject):
    """A span names no agent, and neither does anything it can be mapped with yet."""


# ---------------------------------------------------------------------------------------
# Decoding


def _encoding_of(value: bytes, encoding: str | None) -> str:
    if encoding is None:
        return "otlp_json" if value.lstrip()[:1] == b"{" else "otlp_proto"
    if encoding not in ENCODINGS:
        raise ConfigError(f"unknown OTLP encoding {encoding!r}; expected one of {', '.join(ENCODINGS)}")
    return encoding


def _check_size(value: bytes | None, max_bytes: int | None) -> bytes:
    if value is None or not len(value):
        raise InvalidOtlp("empty message (no OTLP TracesData)")
    if max_bytes is not None and len(value) > max_bytes:
        raise InvalidOtlp(f"message of {len(value)} bytes is larger than the limit of {max_bytes}")
    return value


def _parse_proto(value: bytes) -> TracesData:
    try:
        traces = TracesData.FromString(value)
    except (DecodeError, ValueError, RuntimeError) as error:
        raise InvalidOtlp(f"not OTLP protobuf: {error}") from None
    if not traces.resource_spans:
        # Every field of the bytes was unknown to TracesData: something else was sent.
        raise InvalidOtlp("not OTLP TracesData: protobuf without resource spans")
    return traces


def _parse_json(value: bytes) -> dict:
    raw = orjson.loads(value)  # JSONDecodeError for the caller to handle
    if not isinstance(raw, dict):
        raise InvalidOtlp(f"OTLP/JSON must be an object, got {type(raw).__name__}")
    if "resourceSpans" not in raw:
        raise InvalidOtlp("not OTLP TracesData: JSON object without resourceSpans")
    return raw


def _decode(value: bytes, encoding: str | None, max_bytes: int | None) -> TracesData | dict:
    value = _check_size(value, max_bytes)
    chosen = _encoding_of(value, encoding)
    if chosen == "otlp_proto":
        return _parse_proto(value)
    try:
        return _parse_json(value)
    except orjson.JSONDecodeError as error:
        if encoding is None:
            # `{` after whitespace may also begin protobuf: tag 0x0a (a newline), length 123.
            try:
                return _parse_proto(value)
            except InvalidOtlp:
                pass
        raise InvalidOtlp(f"not valid OTLP/JSON: {error}") from None


def decode_traces(value: bytes, encoding: str | None = None, *, max_bytes: int | None = DEFAULT_MAX_BYTES) -> TracesData:
    """The message as a `TracesData`; OTLP/JSON ids may be hex (the spec) or base64 (plain
    protobuf JSON). Raises `InvalidOtlp`."""
    decoded = _decode(value, encoding, max_bytes)
    if isinstance(decoded, TracesData):
        return decoded
    try:
        _ids_to_base64(decoded)
        return json_format.ParseDict(decoded, TracesData(), ignore_unknown_fields=True)
    except (_Reject, json_format.ParseError, ValueError, TypeError, AttributeError) as error:
        raise InvalidOtlp(f"not valid OTLP/JSON: {error}") from None


def _ids_to_base64(raw: dict) -> None:
    """Hex ids (OTLP/JSON) -> base64 (protobuf JSON), in place, for `json_format`."""
    sizes = {"traceId": 16, "spanId": 8, "parentSpanId": 8}
    for resource_spans in raw.get("resourceSpans") or ():
        for scope_spans in resource_spans.get("scopeSpans") or ():
            for span in scope_spans.get("spans") or ():
                for item in (span, *(span.get("links") or ())):
                    for key, size in sizes.items():
                        if isinstance(item.get(key), str) and item[key]:
                            item[key] = base64.b64encode(_json_id(item[key], size, key)).decode()


def _json_id(value: Any, size: int, name: str) -> bytes:
    """An id of OTLP/JSON: hex (the spec) or base64 (protobuf's JSON mapping of bytes)."""
    if not isinstance(value, str):
        raise _Reject(f"{name} must be a string, got {type(value).__name__}")
    try:
        if len(value) == 2 * size:
            return bytes.fromhex(value)
        decoded = base64.b64decode(value, validate=True)
    except (ValueError, binascii.Error):
        raise _Reject(f"{name} {value[:64]!r} is neither hex nor base64") from None
    if len(decoded) != size:
        raise _Reject(f"{name} {value[:64]!r} is not {size} bytes")
    return decoded


# ---------------------------------------------------------------------------------------
# Spans: one light view of a proto span or an OTLP/JSON span


def _proto_value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    if kind == "string_value":
        return value.string_value
    if kind == "int_value":
        return value.int_value
    if kind == "double_value":
        return value.double_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "array_value":
        return [_proto_value(item) for item in value.array_value.values]
    if kind == "kvlist_value":
        return {item.key: _proto_value(item.value) for item in value.kvlist_value.values}
    if kind == "bytes_value":
        return base64.b64encode(value.bytes_value).decode()
    return None


def _json_value(value: Any) -> Any:
    if not isinstance(value, dict):
        raise _Reject(f"an attribute value must be an AnyValue object, got {type(value).__name__}")
    for kind, inner in value.items():
        if kind == "stringValue":
            if not isinstance(inner, str):
                raise _Reject("stringValue must be a string")
            return inner
        if kind == "intValue":
            if isinstance(inner, bool) or not isinstance(inner, (int, str, float)):
                raise _Reject("intValue must be an integer")
            try:
                number = int(inner)
            except ValueError:
                raise _Reject(f"intValue {str(inner)[:64]!r} is not an integer") from None
            if isinstance(inner, float) and inner != number:
                raise _Reject(f"intValue {inner!r} is not an integer")
            return number
        if kind == "doubleValue":
            try:
                return float(inner)
            except (TypeError, ValueError):
                raise _Reject(f"doubleValue {str(inner)[:64]!r} is not a number") from None
        if kind == "boolValue":
            if not isinstance(inner, bool):
                raise _Reject("boolValue must be true or false")
            return inner
        if kind == "arrayValue":
            return [_json_value(item) for item in _json_list(inner, "values")]
        if kind == "kvlistValue":
            return _json_attributes(_json_list(inner, "values"))
        if kind == "bytesValue":
            return inner
    return None


def _json_list(container: Any, key: str) -> list:
    if not isinstance(container, dict):
        raise _Reject(f"expected an object holding {key!r}")
    items = container.get(key)
    if items is None:
        return []
    if not isinstance(items, list):
        raise _Reject(f"{key!r} must be a list")
    return items


def _json_attributes(items: list) -> dict:
    out = {}
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("key"), str):
            raise _Reject("an attribute must be an object with a string key")
        out[item["key"]] = _json_value(item.get("value", {}))
    return out


def _json_int(value: Any, name: str) -> int:
    if value is None:
        return 0
    if isinstance(value, bool):
        raise _Reject(f"{name} must be an integer")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise _Reject(f"{name} {str(value)[:64]!r} is not an integer") from None


class _Resource:
    __slots__ = ("agent_id", "agent_version", "environment", "service", "task_id", "tenant")

    def __init__(self, attrs: dict) -> None:
        service = _text(attrs.get("service.name"))
        if service.startswith("unknown_service"):  # the SDK's default: no identity
            service = ""
        self.service = service
        self.agent_id = _text(attrs.get("gen_ai.agent.id")) or _text(attrs.get("gen_ai.agent.name")) or service
        self.agent_version = _text(attrs.get("gen_ai.agent.version")) or _text(attrs.get("service.version"))
        self.environment = _text(attrs.get("deployment.environment.name")) or _text(attrs.get("deployment.environment"))
        self.task_id = _text(attrs.get("trackside.task_id"))
        self.tenant = _text(attrs.get("trackside.tenant"))


class _Span:
    """What the mapping reads of a span. `load` fills the rest for the spans that map."""

    __slots__ = (
        "attrs",
        "end_ns",
        "events",
        "genai",
        "id_error",
        "identity",
        "key",
        "name",
        "op",
        "parent_id",
        "raw",
        "resource",
        "span_id",
        "start_ns",
        "status_code",
        "status_message",
        "trace_id",
        "where",
    )

    def __init__(self, raw: Any, resource: _Resource, where: str) -> None:
        self.raw = raw
        self.resource = resource
        self.where = where
        self.trace_id = self.span_id = self.parent_id = self.key = self.id_error = ""
        self.op: str | None = None
        self.genai = False
        self.identity: tuple[str, ...] | None = None

    def load(self) -> None:
        raise NotImplementedError


class _ProtoSpan(_Span):
    __slots__ = ()

    def __init__(self, raw: Any, resource: _Resource, where: str) -> None:
        super().__init__(raw, resource, where)
        kind = None
        for item in raw.attributes:
            key = item.key
            if key.startswith("gen_ai."):
                self.genai = True
                if key == "gen_ai.operation.name":
                    self.op = str(_proto_value(item.value)).lower()
                    break
            elif key == OPENINFERENCE_KIND:
                kind = _proto_value(item.value)
        if self.op is None and kind is not None:
            self.op = _openinference_operation(kind, root=not raw.parent_span_id)
        trace_id, span_id = raw.trace_id, raw.span_id
        parent_id = raw.parent_span_id
        if len(trace_id) != 16 or len(span_id) != 8 or len(parent_id) not in (0, 8):
            self.id_error = (f"malformed ids: trace id of {len(trace_id)} bytes, span id of {len(span_id)} bytes, "
                             f"parent span id of {len(parent_id)} bytes")
        elif trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
            self.id_error = "trace id or span id is all zeros"
        else:
            self.trace_id, self.span_id = trace_id.hex(), span_id.hex()
            self.key = self.trace_id + self.span_id
            if parent_id:
                self.parent_id = parent_id.hex()

    def load(self) -> None:
        raw = self.raw
        if self.id_error:
            raise _Reject(self.id_error)
        self.name = raw.name
        self.start_ns = raw.start_time_unix_nano
        self.end_ns = raw.end_time_unix_nano
        self.status_code = raw.status.code
        self.status_message = raw.status.message
        self.events = [
            (event.name, event.time_unix_nano, {item.key: _proto_value(item.value) for item in event.attributes})
            for event in raw.events if event.name in _WANTED_EVENTS
        ]
        self.attrs = {item.key: _proto_value(item.value) for item in raw.attributes}  # last: loaded


class _JsonSpan(_Span):
    __slots__ = ()

    def __init__(self, raw: Any, resource: _Resource, where: str) -> None:
        super().__init__(raw, resource, where)
        attributes = raw.get("attributes")
        if isinstance(attributes, list):
            kind = None
            for item in attributes:
                key = item.get("key") if isinstance(item, dict) else None
                if not isinstance(key, str):
                    continue
                if key.startswith("gen_ai."):
                    self.genai = True
                    if key == "gen_ai.operation.name":
                        try:
                            self.op = str(_json_value(item.get("value", {}))).lower()
                        except _Reject:
                            self.op = "?"
                        break
                elif key == OPENINFERENCE_KIND:
                    try:
                        kind = _json_value(item.get("value", {}))
                    except _Reject:
                        kind = "?"
            if self.op is None and kind is not None:
                self.op = _openinference_operation(kind, root=not raw.get("parentSpanId"))
        try:
            trace_id = _json_id(raw.get("traceId"), 16, "traceId")
            span_id = _json_id(raw.get("spanId"), 8, "spanId")
            parent = raw.get("parentSpanId")
            parent_id = _json_id(parent, 8, "parentSpanId").hex() if parent else ""
        except _Reject as error:
            self.id_error = str(error)
            return
        if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
            self.id_error = "trace id or span id is all zeros"
            return
        self.trace_id, self.span_id, self.parent_id = trace_id.hex(), span_id.hex(), parent_id
        self.key = self.trace_id + self.span_id

    def load(self) -> None:
        raw = self.raw
        if self.id_error:
            raise _Reject(self.id_error)
        name = raw.get("name", "")
        self.name = name if isinstance(name, str) else ""
        self.start_ns = _json_int(raw.get("startTimeUnixNano"), "startTimeUnixNano")
        self.end_ns = _json_int(raw.get("endTimeUnixNano"), "endTimeUnixNano")
        status = raw.get("status") or {}
        if not isinstance(status, dict):
            raise _Reject("status must be an object")
        code = status.get("code", 0)
        if isinstance(code, str):
            code = _STATUS_NAMES.get(code, code)
        self.status_code = _json_int(code, "status.code")
        message = status.get("message", "")
        self.status_message = message if isinstance(message, str) else ""
        attrs = _json_attributes(_json_list(raw, "attributes"))
        events = []
        for event in _json_list(raw, "events"):
            if not isinstance(event, dict) or event.get("name") not in _WANTED_EVENTS:
                continue
            events.append((
                event["name"], _json_int(event.get("timeUnixNano"), "timeUnixNano"),
                _json_attributes(_json_list(event, "attributes")),
            ))
        self.events = events
        self.attrs = attrs  # last: a span with `attrs` is completely loaded


def _openinference_operation(kind: Any, root: bool) -> str:
    """The GenAI operation an OpenInference span kind maps as (see OPENINFERENCE_OPERATIONS)."""
    kind = str(kind).upper()
    if kind == "CHAIN":
        return "invoke_agent" if root else "chain"
    return OPENINFERENCE_OPERATIONS.get(kind, kind.lower())


def _proto_spans(traces: TracesData) -> Iterator[_Span]:
    for r, resource_spans in enumerate(traces.resource_spans):
        resource = _Resource({item.key: _proto_value(item.value) for item in resource_spans.resource.attributes})
        for s, scope_spans in enumerate(resource_spans.scope_spans):
            for n, span in enumerate(scope_spans.spans):
                yield _ProtoSpan(span, resource, f"resourceSpans[{r}].scopeSpans[{s}].spans[{n}]")


def _json_spans(raw: Mapping) -> Iterator[_Span]:
    def listed(container: Any, key: str) -> list:
        if not isinstance(container, dict):
            raise InvalidOtlp(f"OTLP/JSON: the items of a list holding {key!r} must be objects")
        items = container.get(key)
        if items is None:
            return []
        if not isinstance(items, list):
            raise InvalidOtlp(f"OTLP/JSON: {key!r} must be a list")
        return items

    for r, resource_spans in enumerate(listed(raw, "resourceSpans")):
        resource_value = resource_spans.get("resource") if isinstance(resource_spans, dict) else None
        try:
            attrs = _json_attributes(_json_list(resource_value or {}, "attributes"))
        except _Reject as error:
            raise InvalidOtlp(f"OTLP/JSON: resourceSpans[{r}].resource: {error}") from None
        resource = _Resource(attrs)
        for s, scope_spans in enumerate(listed(resource_spans, "scopeSpans")):
            for n, span in enumerate(listed(scope_spans, "spans")):
                if not isinstance(span, dict):
                    raise InvalidOtlp(f"OTLP/JSON: resourceSpans[{r}].scopeSpans[{s}].spans[{n}] is not an object")
                yield _JsonSpan(span, resource, f"resourceSpans[{r}].scopeSpans[{s}].spans[{n}]")


# ---------------------------------------------------------------------------------------
# Mapping


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return ""


def _bounded(value: Any, depth: int = 0) -> Any:
    if isinstance(value, str):
        return value if len(value) <= MAX_ATTRIBUTE_CHARS else value[:MAX_ATTRIBUTE_CHARS]
    if isinstance(value, list):
        if depth >= 2:
            return None
        return [_bounded(item, depth + 1) for item in value[:MAX_ATTRIBUTE_ITEMS]]
    if isinstance(value, dict):
        if depth >= 2:
            return None
        return {key: _bounded(item, depth + 1) for key, item in list(value.items())[:MAX_ATTRIBUTE_ITEMS]}
    if isinstance(value, float) and math.isnan(value):  # NaN has no JSON
        return None
    return value


def _count(attrs: dict, *keys: str) -> int | None:
    for key in keys:
        value = attrs.get(key)
        if value is None:
            continue
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Reject(f"{key} must be a whole number, got {value!r}"[:200])
        if not 0 <= value <= MAX_COUNT:
            raise _Reject(f"{key} must be between 0 and {MAX_COUNT}, got {value}")
        return value
    return None


def _clip(text: str) -> str:
    return text if len(text) <= MAX_TEXT_CHARS else text[: MAX_TEXT_CHARS - 1] + "…"


def _exception(span: _Span) -> tuple[str, str]:
    for name, _, attrs in span.events:
        if name == EXCEPTION_EVENT:
            return _text(attrs.get("exception.type")), _text(attrs.get("exception.message"))
    return "", ""


def _errors(span: _Span) -> tuple[bool, str, str]:
    """(failed, error_type, error_message) of a span; an error type written as a Python class's
    repr is its class name (the original stays in the span's attributes)."""
    error_type = _text(span.attrs.get("error.type"))
    failed = span.status_code == STATUS_ERROR or (bool(error_type) and span.status_code != STATUS_OK)
    message = span.status_message
    if failed and (not error_type or not message):
        exc_type, exc_message = _exception(span)
        error_type = error_type or exc_type
        message = message or exc_message
    named = _CLASS_REPR.fullmatch(error_type)
    return failed, _clip(named.group(1) if named else error_type), _clip(message)


def _evaluations(span: _Span) -> list[dict]:
    out = []
    for name, time_ns, attrs in span.events:
        if name != EVALUATION_EVENT:
            continue
        out.append({
            "name": _text(attrs.get("gen_ai.evaluation.name")),
            "label": _text(attrs.get("gen_ai.evaluation.score.label")),
            "value": attrs.get("gen_ai.evaluation.score.value"),
            "error_type": _text(attrs.get("error.type")),
            "time": time_ns,
        })
    out.sort(key=lambda evaluation: evaluation["time"])  # stable: equal times keep their order
    return out


def _fraction(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if 0 <= value <= 1 else None


def _outcome(span: _Span, evaluations: list[dict]) -> tuple[str, str, float | None]:
    """(outcome, which rule decided, score) of a run's invoke_agent span: see the README, "Run outcome"."""
    usable = [evaluation for evaluation in evaluations if not evaluation["error_type"]]
    deciding = None
    for evaluation in reversed(usable):
        if evaluation["label"].lower() in EVALUATION_LABELS:
            deciding = evaluation
            break
    score = _fraction(deciding["value"]) if deciding else None
    if score is None and usable:
        score = _fraction(usable[-1]["value"])
    explicit = span.attrs.get("trackside.outcome")
    if explicit is not None:
        outcome = _text(explicit).lower()
        if outcome not in OUTCOMES:
            raise _Reject(f"trackside.outcome must be one of {', '.join(OUTCOMES)}, got {str(explicit)[:64]!r}")
        return outcome, "attribute", score
    if deciding is not None:
        return EVALUATION_LABELS[deciding["label"].lower()], "evaluation", score
    return ("failure" if span.status_code == STATUS_ERROR else "success"), "status", score


def _extra(span: _Span) -> dict:
    """The span's attributes that are no event field, bounded, and where it is in the trace."""
    out = {}
    error_type = span.attrs.get("error.type")
    if isinstance(error_type, str) and _CLASS_REPR.fullmatch(error_type.strip()):
        out["error.type"] = error_type  # as the span wrote it; the event's error_type is the class name
    for key, value in span.attrs.items():
        if key in _MAPPED or key in _CONTENT or key.startswith(_CONTENT_PREFIXES):
            continue
        if len(out) >= MAX_ATTRIBUTES:
            break
        out[key] = _bounded(value)
    out["otel.span_name"] = span.name[:MAX_ATTRIBUTE_CHARS]
    out["otel.span_id"] = span.span_id
    if span.parent_id:
        out["otel.parent_span_id"] = span.parent_id
    return out


class _Batch:
    """The spans of one message, indexed for the walk from a span up to its run."""

    def __init__(self, spans: list[_Span]) -> None:
        self.spans = spans
        self.index = {span.key: span for span in spans if span.key}

    def same_call_as_parent(self, span: _Span) -> bool:
        """Whether `span` is a model call inside a model-call span of this batch for the same
        call (the same model and usage): a framework's span over its client library's."""
        parent = self.index.get(span.trace_id + span.parent_id) if span.parent_id else None
        if parent is None or parent.op not in LLM_OPERATIONS:
            return False
        call = _call_of(span)
        return call is not None and call == _call_of(parent)

    def run_of(self, span: _Span) -> _Span | None:
        """The outermost invoke_agent ancestor of `span` in this batch (not `span` itself)."""
        found = None
        current = span
        for _ in range(MAX_ANCESTORS):
            if not current.parent_id:
                break
            current = self.index.get(current.trace_id + current.parent_id)
            if current is None:
                break
            if current.op in RUN_OPERATIONS:
                found = current
        return found


_USAGE_KEYS = (("gen_ai.usage.input_tokens", "gen_ai.usage.prompt_tokens", "llm.token_count.prompt"),
               ("gen_ai.usage.output_tokens", "gen_ai.usage.completion_tokens", "llm.token_count.completion"))


def _call_of(span: _Span) -> tuple | None:
    """What identifies one model call across two layers of instrumentation: its model and usage
    (None for either when not reported: a failed call has no usage in either layer)."""
    try:
        _ensure_loaded(span)
        usage = tuple(_count(span.attrs, *keys) for keys in _USAGE_KEYS)
    except _Reject:
        return None
    return (_first(span.attrs, ("gen_ai.request.model", "gen_ai.response.model", "llm.model_name")), *usage)


def _ensure_loaded(span: _Span) -> None:
    if not hasattr(span, "attrs"):
        span.load()


# (agent id, agent version, session, task, tenant) of a span's own attributes
_IDENTITY_KEYS = (
    ("gen_ai.agent.id", "gen_ai.agent.name", "agent.name"), ("gen_ai.agent.version",),
    ("gen_ai.conversation.id", "session.id"), ("trackside.task_id",), ("trackside.tenant",),
)
_NO_IDENTITY = ("",) * len(_IDENTITY_KEYS)


def _first(attrs: dict, keys: tuple[str, ...]) -> str:
    for key in keys:
        value = attrs.get(key)
        if value is not None:
            text = _text(value)
            if text:
                return text
    return ""


def _identity(span: _Span | None) -> tuple[str, ...]:
    if span is None:
        return _NO_IDENTITY
    if span.identity is None:
        attrs = span.attrs
        span.identity = tuple(_first(attrs, keys) for keys in _IDENTITY_KEYS)
    return span.identity


def _common(span: _Span, run: tuple[str, ...]) -> dict:
    """The fields every event has: the span's own attributes, else its run's (`run`: the
    identity of its run span, in this message or remembered), else the resource's."""
    resource = span.resource
    agent_id, version, session_id, task_id, tenant = _identity(span)
    run_agent, run_version, run_session, run_task, run_tenant = run
    if not agent_id:
        agent_id, version = run_agent, version or run_version
    elif agent_id == run_agent:
        version = version or run_version
    # (a span naming another agent than its run's does not take the run's version)
    if not agent_id:
        agent_id = resource.agent_id
        if not agent_id:
            raise _NoIdentity(
                "no agent identity: no gen_ai.agent.id or gen_ai.agent.name on the span or its run, "
                "and no service.name on the resource"
            )
    event = {
        "run_id": span.trace_id,
        "agent_id": agent_id,
        "agent_version": version or resource.agent_version or "unknown",
    }
    session_id = session_id or run_session
    if session_id:
        event["session_id"] = session_id
    task_id = task_id or run_task or resource.task_id
    if task_id:
        event["task_id"] = task_id
    tenant = tenant or run_tenant or resource.tenant
    if tenant:
        event["tenant"] = tenant
    if resource.environment:
        event["environment"] = resource.environment
    return event


def _times(span: _Span) -> tuple[int, float]:
    if span.start_ns <= 0:
        raise _Reject("no start time")
    if span.end_ns <= 0:
        raise _Reject("no end time")
    if span.end_ns < span.start_ns:
        raise _Reject("ends before it starts")
    return span.start_ns // 1_000_000, (span.end_ns - span.start_ns) / 1e6


def _llm_call(span: _Span, run: tuple[str, ...]) -> list[dict]:
    start_ms, latency_ms = _times(span)
    attrs = span.attrs
    event = _common(span, run)
    failed, error_type, message = _errors(span)
    event.update(event_id=f"otlp:{span.trace_id}:{span.span_id}", ts=start_ms, type="llm_call",
                 latency_ms=latency_ms, status="error" if failed else "ok")
    model = _first(attrs, ("gen_ai.request.model", "gen_ai.response.model", "llm.model_name"))
    if model:
        event["model"] = model
    provider = _first(attrs, ("gen_ai.provider.name", "gen_ai.system", "llm.provider", "llm.system"))
    if provider:
        event["provider"] = provider
    for field, keys in (
        ("input_tokens", ("gen_ai.usage.input_tokens", "gen_ai.usage.prompt_tokens", "llm.token_count.prompt")),
        ("output_tokens", ("gen_ai.usage.output_tokens", "gen_ai.usage.completion_tokens",
                           "llm.token_count.completion")),
        ("cache_read_input_tokens", ("gen_ai.usage.cache_read.input_tokens",
                                     "llm.token_count.prompt_details.cache_read")),
    ):
        count = _count(attrs, *keys)
        if count is not None:
            event[field] = count
    if error_type:
        event["error_type"] = error_type
    extra = _extra(span)
    if message:
        extra["otel.status_message"] = message
    evaluations = _evaluations(span)
    if evaluations:
        extra["gen_ai.evaluation"] = _evaluation_summary(evaluations)
    event["attributes"] = extra
    return [event]


def _tool_args(value: Any) -> tuple[dict | None, str]:
    """(args object, args_hash) of gen_ai.tool.call.arguments: see streams/ingest/README.md, "Fields"."""
    if isinstance(value, dict):
        return value, ""
    if isinstance(value, str):
        try:
            parsed = orjson.loads(value)
        except orjson.JSONDecodeError:
            return None, args_hash(value)
        if isinstance(parsed, dict):
            return parsed, ""
        value = parsed
    return None, args_hash(orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode())


def _tool_call(span: _Span, run: tuple[str, ...]) -> list[dict]:
    start_ms, latency_ms = _times(span)
    attrs = span.attrs
    tool = _first(attrs, ("gen_ai.tool.name", "tool.name"))
    if not tool and span.name.startswith("execute_tool "):
        tool = span.name[len("execute_tool "):].strip()
    if not tool and OPENINFERENCE_KIND in attrs:  # OpenInference names a tool span after its function
        tool = span.name.strip()
    if not tool:
        raise _Reject("execute_tool span without gen_ai.tool.name")
    event = _common(span, run)
    failed, error_type, message = _errors(span)
    status = "ok"
    if failed:
        lowered = error_type.lower()
        status = "timeout" if "timeout" in lowered or "deadline" in lowered else "error"
    event.update(event_id=f"otlp:{span.trace_id}:{span.span_id}", ts=start_ms, type="tool_call", tool=tool,
                 latency_ms=latency_ms, status=status)
    raw_args = attrs.get("gen_ai.tool.call.arguments")
    if OPENINFERENCE_KIND in attrs and attrs.get("input.value") is not None:
        # OpenInference's tool input is the call's arguments; its GenAI dual-write may put the
        # tool's JSON schema in gen_ai.tool.call.arguments: the real arguments win
        raw_args = attrs["input.value"]
    if raw_args is not None:
        args, hashed = _tool_args(raw_args)
        if args is not None:
            event["args"] = args
        else:
            event["args_hash"] = hashed
    if error_type:
        event["error_type"] = error_type
    if message:
        event["error_message"] = message
    extra = _extra(span)
    evaluations = _evaluations(span)
    if evaluations:
        extra["gen_ai.evaluation"] = _evaluation_summary(evaluations)
    event["attributes"] = extra
    return [event]


def _evaluation_summary(evaluations: list[dict]) -> list[dict]:
    return [
        {key: _bounded(evaluation[key]) for key in ("name", "label", "value", "error_type") if evaluation[key] not in ("", None)}
        for evaluation in evaluations[-MAX_EVALUATIONS:]
    ]


def _run(span: _Span, run: tuple[str, ...]) -> list[dict]:
    start_ms, _ = _times(span)
    end_ms = span.end_ns // 1_000_000
    common = _common(span, _NO_IDENTITY)
    evaluations = _evaluations(span)
    outcome, source, score = _outcome(span, evaluations)
    base_id = f"otlp:{span.trace_id}:{span.span_id}"
    start = {**common, "event_id": base_id + ":start", "ts": start_ms, "type": "run_start", "attributes": _extra(span)}
    end = {**common, "event_id": base_id + ":end", "ts": end_ms, "type": "run_end", "outcome": outcome}
    if score is not None:
        end["score"] = score
    _, error_type, message = _errors(span)
    if error_type:
        end["error_type"] = error_type
    if message:
        end["error_message"] = message
    end_attributes: dict[str, Any] = {"trackside.outcome_source": source, "otel.span_id": span.span_id}
    if evaluations:
        end_attributes["gen_ai.evaluation"] = _evaluation_summary(evaluations)
    end["attributes"] = end_attributes
    return [start, end]


_MAPPERS = {
    **dict.fromkeys(RUN_OPERATIONS, _run),
    **dict.fromkeys(LLM_OPERATIONS, _llm_call),
    **dict.fromkeys(TOOL_OPERATIONS, _tool_call),
}


def _skip_reason(span: _Span) -> str | None:
    op = span.op
    if op is None:
        return "genai_without_operation" if span.genai else "not_genai"
    if op in _MAPPERS:
        return None
    return f"operation:{op}" if op in UNMAPPED_OPERATIONS else "operation:other"


class TraceMemory:
    """What the mapping keeps of traces between messages (the ingest stage holds one), so that a
    trace is one run however its spans travel: the identity of each recent trace's run (its
    agent, version, session, task, tenant, from its run span), the model calls mapped (so that
    one call instrumented twice counts once when its two spans travel apart), and the spans that
    name no agent, held until their run's span comes.

    Bounds: the `traces` traces seen last (the least recently seen forgotten first); at most
    `held_spans` spans held, each for at most `hold_ms` (ingestion time). A span held past
    either bound, or still held when the ingest stage stops, is given up: rejected as before,
    for the dead letters, with its own message's source and the span alone as payload.
    """

    def __init__(self, traces: int = 100_000, held_spans: int = 10_000, hold_ms: int = 300_000) -> None:
        self.max_traces, self.max_held, self.hold_ms = traces, held_spans, hold_ms
        self._identities: OrderedDict[str, tuple[str, ...]] = OrderedDict()  # trace -> its run's identity
        # trace -> (span id -> its call, parent span id -> its children's calls)
        self._calls: dict[str, tuple[dict[str, tuple], dict[str, set[tuple]]]] = {}
        self._held: OrderedDict[str, tuple[_Span, str, int]] = OrderedDict()  # span key -> (span, source, since)

    def identity(self, trace_id: str) -> tuple[str, ...] | None:
        return self._identities.get(trace_id)

    def learn(self, trace_id: str, identity: tuple[str, ...]) -> None:
        self._identities[trace_id] = identity
        self._identities.move_to_end(trace_id)
        while len(self._identities) > self.max_traces:
            old, _ = self._identities.popitem(last=False)
            self._calls.pop(old, None)

    def same_call_mapped(self, span: _Span) -> bool:
        """Whether the model call of `span` was mapped already from the other layer's span (its
        parent's, or a child's) in an earlier message; remembers it otherwise."""
        call = _call_of(span)
        if call is None:
            return False
        known = self._calls.get(span.trace_id)
        if known is None:
            known = self._calls[span.trace_id] = ({}, {})
            if span.trace_id not in self._identities:  # a trace first seen by its calls: bounded alike
                self.learn(span.trace_id, _NO_IDENTITY)
        by_span, by_parent = known
        if by_span.get(span.parent_id) == call or call in by_parent.get(span.span_id, ()):
            return True
        by_span[span.span_id] = call
        by_parent.setdefault(span.parent_id, set()).add(call)
        return False

    def hold(self, span: _Span, source: str, now_ms: int) -> None:
        if isinstance(span.raw, PbSpan):  # alone: a part of the message would keep it all alive
            alone = PbSpan()
            alone.CopyFrom(span.raw)
            span.raw = alone
        self._held[span.key] = (span, source, now_ms)

    def release(self, trace_ids: set[str]) -> list[tuple[_Span, str]]:
        """The held spans of these traces (whose run's identity just came)."""
        keys = [key for key, (span, _, _) in self._held.items() if span.trace_id in trace_ids]
        return [self._held.pop(key)[:2] for key in keys]

    def expire(self, now_ms: int, everything: bool = False) -> list[GivenUp]:
        """The held spans given up (past the bounds, or all of them), one per message they came in."""
        by_source: dict[str, list[tuple[_Span, str]]] = {}
        while self._held:
            key, (span, source, since) = next(iter(self._held.items()))
            if everything:
                why = "the ingest stage stopped while it held the span"
            elif len(self._held) > self.max_held:
                why = f"more than {self.max_held} spans were held"
            elif now_ms - since >= self.hold_ms:
                why = f"no span of its run came within {self.hold_ms // 1000} s"
            else:
                break
            del self._held[key]
            by_source.setdefault(source, []).append((span, why))
        return [_given_up(source, given) for source, given in by_source.items()]

    def oldest_held(self) -> dict[tuple[str, int], int]:
        """(topic, partition) -> the offset of the oldest message whose spans are still held:
        where the ingest stage may commit up to, so that a restart reads them again."""
        oldest: dict[tuple[str, int], int] = {}
        for _, source, _ in self._held.values():
            topic, partition, offset = source.rsplit(":", 2)
            key = (topic, int(partition))
            oldest[key] = min(oldest.get(key, int(offset)), int(offset))
        return oldest

    def __len__(self) -> int:
        """Spans held."""
        return len(self._held)


def _given_up(source: str, given: list[tuple[_Span, str]]) -> GivenUp:
    """One message's held spans given up: the reasons, and the spans as a message of their own
    (`otlp_proto` or OTLP/JSON as they came; their resource's attributes are not kept)."""
    spans = [span for span, _ in given]
    reasons = "; ".join(
        f"span {span.trace_id}:{span.span_id} ({span.op} {_name(span)}): no agent identity: no gen_ai.agent.id or "
        f"gen_ai.agent.name on the span, no service.name on its resource, and its run is unknown: held, given up "
        f"as {why}" for span, why in given[:20])
    more = f"; and {len(given) - 20} more" if len(given) > 20 else ""
    if isinstance(spans[0].raw, PbSpan):
        traces = TracesData()
        traces.resource_spans.add().scope_spans.add().spans.extend(span.raw for span in spans)
        payload = traces.SerializeToString()
    else:
        payload = orjson.dumps({"resourceSpans": [{"scopeSpans": [{"spans": [span.raw for span in spans]}]}]})
    return GivenUp(spans[0].trace_id, f"{len(given)} span(s) held and given up: {reasons}{more}", source, payload)


def _map(spans: list[_Span], normalise: bool, keep_raw_args: bool, memory: TraceMemory | None = None,
         source: str = "", now_ms: int = 0) -> Mapped:
    batch = _Batch(spans)
    events: list[dict] = []
    rejected: list[Rejection] = []
    skipped: Counter[str] = Counter()
    seen: set[str] = set()
    learned: set[str] = set()  # traces whose run's identity this message brought
    held = 0

    def map_one(span: _Span, run_identity: tuple[str, ...], where: str) -> bool:
        """Map one span into `events` (or `rejected`); False when it names no agent yet."""
        try:
            _ensure_loaded(span)
            mapped = _MAPPERS[span.op](span, run_identity)
            checked = [validate(event, keep_raw_args=keep_raw_args) for event in mapped]
        except _NoIdentity as error:
            if memory is not None and span.key:
                return False
            rejected.append(Rejection(where, f"{span.op} span {_name(span)}: {error}"))
            return True
        except _Reject as error:
            rejected.append(Rejection(where, f"{span.op} span {_name(span)}: {error}"))
            return True
        except InvalidEvent as error:
            rejected.append(Rejection(where, f"{span.op} span {_name(span)} makes an invalid event: {error}"))
            return True
        if memory is not None and span.op in RUN_OPERATIONS:
            start = mapped[0]
            memory.learn(span.trace_id, (start["agent_id"], start["agent_version"], start.get("session_id", ""),
                                         start.get("task_id", ""), start.get("tenant", "")))
            learned.add(span.trace_id)
        events.extend(checked if normalise else mapped)
        return True

    for span in spans:
        reason = _skip_reason(span)
        if reason is not None:
            skipped[reason] += 1
            continue
        if span.key:
            if span.key in seen:
                skipped["duplicate_span"] += 1  # the same span twice in one message: one set of events
                continue
            seen.add(span.key)
        where = f"{span.trace_id}:{span.span_id}" if span.key else span.where
        run = batch.run_of(span) if span.key else None
        if span.op in RUN_OPERATIONS and run is not None:
            skipped["nested_invoke_agent"] += 1
            continue
        if span.op in LLM_OPERATIONS and (batch.same_call_as_parent(span) or (
                memory is not None and span.key and memory.same_call_mapped(span))):
            skipped["nested_llm_call"] += 1  # one call instrumented twice (a framework over its client)
            continue
        run_identity = _NO_IDENTITY
        if run is not None:
            try:
                _ensure_loaded(run)
                run_identity = _identity(run)
            except _Reject:
                pass  # the run's span is rejected on its own; its children map without it
        elif memory is not None and span.key:
            run_identity = memory.identity(span.trace_id) or _NO_IDENTITY
        if not map_one(span, run_identity, where):
            memory.hold(span, source, now_ms)
            held += 1
    given_up: list[GivenUp] = []
    if memory is not None:
        for span, _origin in memory.release(learned):
            # its events come with this message; they were valid as far as they went
            map_one(span, memory.identity(span.trace_id), f"{span.trace_id}:{span.span_id}")
        given_up = memory.expire(now_ms)
    events.sort(key=lambda event: (event["ts"], _TYPE_RANK[event["type"]]))
    return Mapped(events, rejected, skipped, held, given_up)


def _name(span: _Span) -> str:
    raw = span.raw
    name = raw.get("name") if isinstance(raw, dict) else raw.name
    return repr(name[:80]) if isinstance(name, str) and name else "(unnamed)"


def spans_to_events(traces: TracesData | Mapping, *, normalise: bool = False, keep_raw_args: bool = False,
                    memory: TraceMemory | None = None, source: str = "", now_ms: int = 0) -> Mapped:
    """Agent events of a `TracesData`, or of a parsed OTLP/JSON object; see streams/ingest/README.md.
    With `memory`, what earlier messages brought counts (`TraceMemory`); `source` names this
    message (topic:partition:offset) and `now_ms` is the time it is ingested."""
    if isinstance(traces, TracesData):
        spans = list(_proto_spans(traces))
    elif isinstance(traces, Mapping):
        spans = list(_json_spans(traces))
    else:
        raise TypeError(f"expected TracesData or an OTLP/JSON object, got {type(traces).__name__}")
    return _map(spans, normalise, keep_raw_args, memory, source, now_ms)


def otlp_to_events(
    value: bytes,
    encoding: str | None = None,
    *,
    normalise: bool = False,
    keep_raw_args: bool = False,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
    memory: TraceMemory | None = None,
    source: str = "",
    now_ms: int = 0,
) -> Mapped:
    """Agent events of one `otlp_spans` message. Raises `InvalidOtlp` when the message is
    unreadable; spans that cannot be mapped are in `rejected`."""
    return spans_to_events(_decode(value, encoding, max_bytes), normalise=normalise, keep_raw_args=keep_raw_args,
                           memory=memory, source=source, now_ms=now_ms)
