"""Agent events of one poll, decoded and checked in bulk into `events` rows (columns in table order).
msgspec checks the contract's field table in C; any event it cannot vouch for takes `contracts.events.parse`."""

from __future__ import annotations

import re
import time
from typing import Annotated, Any, Literal, Sequence, Union

import msgspec
import orjson

from streams.contracts import events as contract
from streams.contracts.events import COLUMNS, InvalidEvent, args_hash, parse, parse_ts
from streams.contracts.tables import EVENTS

# A row holds every column of `events`, in the table's order; the sink fills the last three.
ROW = tuple(EVENTS.names)
INDEX = {name: i for i, name in enumerate(ROW)}
COST_USD, COST_SOURCE, SOURCE, INGESTED_AT = (INDEX[n] for n in ("cost_usd", "cost_source", "source", "ingested_at"))
_DEFAULT_ROW = [contract._TEXT_DEFAULTS.get(name, "") for name in ROW]
_DEFAULT_ROW[INGESTED_AT] = 0
_ROW_OF_EVENT = tuple(INDEX[name] for name in COLUMNS)
_IDS = tuple(INDEX[field.name] for field in contract.COMMON_FIELDS if field.kind == "id")
_OBJECTS = {field.name for fields in (contract.COMMON_FIELDS, *contract.TYPE_FIELDS.values()) for field in fields
            if field.kind == "object"}
_ABSENT = (b"", b"null")


def _annotation(field: contract.Field) -> Any:
    """The msgspec type of a field: as strict as the contract's check, or stricter (then the
    event takes the exact path, which says why)."""
    if field.kind == "id":
        return Annotated[str, msgspec.Meta(min_length=1, max_length=contract.MAX_ID_CHARS)]
    if field.kind == "timestamp":
        return Union[int, float, str]
    if field.kind == "object":
        return msgspec.Raw  # kept as its JSON text; `b"null"` is absent
    kind = {
        "text": Annotated[str, msgspec.Meta(max_length=contract.MAX_TEXT_CHARS)],
        "count": Annotated[int, msgspec.Meta(ge=0, le=contract.MAX_COUNT)],
        "amount": Annotated[float, msgspec.Meta(ge=0, le=contract.MAX_COUNT)],
        "fraction": Annotated[float, msgspec.Meta(ge=0, le=1)],
        "choice": Literal[field.choices] if field.choices else None,
    }[field.kind]
    return kind if field.required else Union[kind, None]


def _struct(kind: str) -> type[msgspec.Struct]:
    fields = []
    for field in contract.COMMON_FIELDS + contract.TYPE_FIELDS.get(kind, ()):
        if field.name == "type":
            continue  # the tag
        annotation = _annotation(field)
        if field.kind == "object":
            fields.append((field.name, annotation, msgspec.Raw(b"")))
        elif field.required:
            fields.append((field.name, annotation))
        else:
            fields.append((field.name, annotation, None))
    # An unknown field goes to `attributes` on the exact path, so it is refused here.
    return msgspec.defstruct(f"Event_{kind}", fields, tag_field="type", tag=kind, kw_only=True,
                             forbid_unknown_fields=True, array_like=False)


_STRUCTS = {kind: _struct(kind) for kind in contract.EVENT_TYPES}
_DECODER = msgspec.json.Decoder(Union[tuple(_STRUCTS.values())])
# Per struct: where each of its fields goes in a row, the objects among them, and its type.
_STORED_AS = {kind: {field.name: field.stored_as for field in contract.COMMON_FIELDS + contract.TYPE_FIELDS.get(kind, ())}
              for kind in contract.EVENT_TYPES}
_LAYOUT = {
    struct: (tuple(INDEX[_STORED_AS[kind][name]] for name in struct.__struct_fields__),
             tuple(i for i, name in enumerate(struct.__struct_fields__) if name in _OBJECTS),
             kind)
    for kind, struct in _STRUCTS.items()
}
_TYPE, _TS, _ARGS, _ARGS_HASH, _STATUS = (INDEX[n] for n in ("type", "ts", "args", "args_hash", "status"))
_TOOL_OR_LLM = ("tool_call", "llm_call")
_REQUIRED_KEYS = tuple(b'"%s"' % name.encode() for name in ("event_id", "run_id", "type", "ts", "agent_id",
                                                             "agent_version"))


_REQUIRED_NAMES = re.compile(b"|".join(_REQUIRED_KEYS))


class _Unsure(Exception):
    """The fast path cannot vouch for this event: the exact path decides (and says why)."""


def decode_events(values: Sequence[bytes | None], *, max_bytes: int = 1_000_000,
                  keep_raw_args: bool = False) -> list[list | InvalidEvent]:
    """For each message value, its `events` row (cost_source, source and ingested_at to fill) or
    the `InvalidEvent` that `contracts.events.parse` raises for it: the same rows and the same
    reasons as parsing one by one, for less CPU (jobs/README.md, "Session 5")."""
    latest = time.time_ns() // 1_000_000 + contract.MAX_FUTURE_MS
    out: list[list | InvalidEvent | None] = []  # None: the exact path decides
    for value in values:
        try:
            out.append(_fast(value, latest, keep_raw_args) if value is not None and len(value) <= max_bytes else None)
        except (_Unsure, msgspec.MsgspecError, ValueError):
            out.append(None)
    # A required field given twice makes an event ambiguous (contracts.events.parse refuses
    # it; msgspec keeps the last). Every event decoded here has each of the six, and with no
    # `\\u` escape anywhere their names are written out: if the names occur six times per
    # event over all of them, each occurs once in each. Otherwise each event is looked at alone.
    fast = [i for i, row in enumerate(out) if row is not None]
    joined = b"".join(values[i] for i in fast)
    if b"\\u" in joined or len(_REQUIRED_NAMES.findall(joined)) != len(_REQUIRED_KEYS) * len(fast):
        for i in fast:
            try:
                contract._reject_duplicate_fields(values[i])
            except InvalidEvent as error:
                out[i] = error
    return [row if row is not None else _exact(value, max_bytes, keep_raw_args) for row, value in zip(out, values)]


def _exact(value: bytes | None, max_bytes: int, keep_raw_args: bool) -> list | InvalidEvent:
    try:
        event = parse(value, max_bytes=max_bytes, keep_raw_args=keep_raw_args)
    except InvalidEvent as error:
        return error
    return event_row(event)


def event_row(event: dict) -> list:
    """A normalised event (`contracts.events.parse`, the OTLP mapping) as a row."""
    row = list(_DEFAULT_ROW)
    for index, name in zip(_ROW_OF_EVENT, COLUMNS):
        row[index] = event[name]
    row[COST_SOURCE] = event.get("cost_source", "")
    return row


def _fast(value: bytes, latest: int, keep_raw_args: bool) -> list:
    decoded = _DECODER.decode(value)
    indices, objects, kind = _LAYOUT[type(decoded)]
    values = msgspec.structs.astuple(decoded)
    row = list(_DEFAULT_ROW)
    for index, item in zip(indices, values):
        if item is not None:
            row[index] = item
    row[_TYPE] = kind
    for index in _IDS:
        if row[index].isspace():
            raise _Unsure
    ts = row[_TS]
    if type(ts) is int:
        if not contract.EARLIEST_TS_MS <= ts <= latest:
            raise _Unsure
    else:
        row[_TS] = parse_ts(ts)  # a ValueError takes the exact path
    for position in objects:
        raw = bytes(values[position])
        index = indices[position]
        if raw in _ABSENT:
            row[index] = ""
        elif raw[:1] == b"{":
            row[index] = orjson.dumps(orjson.loads(raw), option=orjson.OPT_SORT_KEYS).decode()
        else:
            raise _Unsure
    if kind in _TOOL_OR_LLM:
        if kind == "tool_call" and row[_ARGS]:
            row[_ARGS_HASH] = row[_ARGS_HASH] or args_hash(row[_ARGS])
            if not keep_raw_args:
                row[_ARGS] = ""
        if row[_STATUS] == "":
            row[_STATUS] = "ok"
    return row
