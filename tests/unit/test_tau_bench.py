"""Tests of the tau-bench importer on the real file (200 GPT-4o airline runs)."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from decimal import Decimal
from pathlib import Path

import orjson
import pytest

import jobs.tau_bench as tb

DATA = Path("/work/shared/data/tau-bench/gpt-4o-airline.json")
pytestmark = pytest.mark.skipif(not DATA.exists(), reason=f"{DATA} not present")

COMMON = {"event_id": str, "ts": int, "type": str, "run_id": str, "agent_id": str, "agent_version": str}
BY_TYPE = {
    "run_start": {},
    "llm_call": {
        "model": str, "provider": str, "input_tokens": int, "output_tokens": int,
        "cache_read_input_tokens": int, "latency_ms": int, "status": str,
    },
    "tool_call": {"tool": str, "args": dict, "status": str, "latency_ms": int},
    "run_end": {"outcome": str, "score": float},
}


@pytest.fixture(scope="module")
def runs() -> list[dict]:
    return json.loads(DATA.read_text())


@pytest.fixture(scope="module")
def events() -> list[dict]:
    return tb.import_runs(DATA)


def by_run(events: list[dict]) -> dict[str, list[dict]]:
    out = defaultdict(list)
    for event in events:
        out[event["run_id"]].append(event)
    return out


# --- tokenizer ---------------------------------------------------------------------------


def test_tokenizer_is_real_o200k_base():
    enc = tb.o200k_base()
    assert enc.name == "o200k_base"
    assert enc.n_vocab == 200_019
    # ids published for o200k_base (OpenAI cookbook, tiktoken docs)
    assert enc.encode("hello world") == [24912, 2375]
    assert enc.encode("tiktoken is great!") == [83, 8251, 2488, 382, 2212, 0]
    assert enc.decode(enc.encode("Flight HAT030 on 2024-05-13 ✈️")) == "Flight HAT030 on 2024-05-13 ✈️"
    assert enc.encode("<|endoftext|>", allowed_special="all") == [199999]


def test_copied_pattern_matches_tiktokens_own_definition(monkeypatch):
    # The pattern and special tokens are copied from tiktoken; the vocabulary load is the
    # only part of tiktoken's definition that needs the network, so stub it out.
    openai_public = pytest.importorskip("tiktoken_ext.openai_public")
    monkeypatch.setattr(openai_public, "load_tiktoken_bpe", lambda *args, **kwargs: {})
    spec = openai_public.o200k_base()
    assert spec["pat_str"] == tb.O200K_PAT_STR
    assert spec["special_tokens"] == tb.O200K_SPECIAL_TOKENS
    assert tb.O200K_SHA256 in Path(openai_public.__file__).read_text()


def test_token_accounting_of_one_run(runs, events):
    run = runs[0]
    first = next(e for e in events if e["run_id"] == "tau-airline-0-0" and e["type"] == "llm_call")
    enc = tb.o200k_base()
    system, user = run["traj"][0], run["traj"][1]
    expected = sum(3 + len(enc.encode(m["role"])) + len(enc.encode(m["content"])) for m in (system, user)) + 3
    assert first["input_tokens"] == expected
    assert first["output_tokens"] == len(enc.encode(run["traj"][2]["content"]))


def test_input_tokens_grow_within_a_run(events):
    for run_events in by_run(events).values():
        inputs = [e["input_tokens"] for e in run_events if e["type"] == "llm_call"]
        assert inputs == sorted(inputs) and len(set(inputs)) == len(inputs)


# --- counts ------------------------------------------------------------------------------


def test_counts_match_the_file(runs, events):
    kinds = Counter(e["type"] for e in events)
    assert len(runs) == 200
    assert kinds["run_start"] == kinds["run_end"] == 200
    assert kinds["llm_call"] == sum(m["role"] == "assistant" for r in runs for m in r["traj"]) == 2454
    assert kinds["tool_call"] == sum(len(m.get("tool_calls") or ()) for r in runs for m in r["traj"]) == 1164
    assert len(events) == 200 + 200 + 2454 + 1164
    assert sum(e["outcome"] == "success" for e in events if e["type"] == "run_end") == 84
    assert sum(r["reward"] == 1 for r in runs) == 84
    assert len({e["tool"] for e in events if e["type"] == "tool_call"}) == 14
    assert sum(e["status"] == "error" for e in events if e["type"] == "tool_call") == 73


def test_unfinished_runs_are_marked(events):
    capped = {e["run_id"] for e in events if e["type"] == "run_end" and e.get("error_type") == "max_steps"}
    assert capped == {"tau-airline-33-0", "tau-airline-2-1", "tau-airline-9-2", "tau-airline-9-3", "tau-airline-46-3"}


# --- contract ----------------------------------------------------------------------------


def test_every_event_follows_the_contract(events):
    ids = set()
    for event in events:
        for name, kind in {**COMMON, **BY_TYPE[event["type"]]}.items():
            assert isinstance(event[name], kind), (event["event_id"], name)
        assert event["event_id"] not in ids
        ids.add(event["event_id"])
        assert event["agent_id"] == "tau-airline-gpt4o" and event["agent_version"] == "historical"
        assert event["event_id"].startswith(event["run_id"] + ":")
        assert isinstance(event["task_id"], str)
        assert "cost_usd" not in event  # Trackside prices calls itself
        if event["type"] == "llm_call":
            assert (event["model"], event["provider"], event["status"]) == ("gpt-4o", "openai", "ok")
            assert event["input_tokens"] > 0 and event["output_tokens"] > 0
            assert event["cache_read_input_tokens"] == 0
        elif event["type"] == "tool_call":
            assert event["status"] in ("ok", "error")
            if event["status"] == "error":
                assert event["error_type"] == "tool_error" and event["error_message"].startswith("Error")
            else:
                assert "error_type" not in event
        elif event["type"] == "run_end":
            assert event["outcome"] == ("success" if event["score"] == 1 else "failure")
    assert len(ids) == len(events)


def test_trackside_validator_accepts_every_event(events):
    streams_events = pytest.importorskip("streams.contracts.events")
    for event in events:
        parsed = streams_events.parse(orjson.dumps(event))  # raises InvalidEvent with the reason
        assert (parsed["event_id"], parsed["type"], parsed["run_id"]) == (event["event_id"], event["type"], event["run_id"])


# --- time --------------------------------------------------------------------------------


def test_timestamps(events):
    assert [e["ts"] for e in events] == sorted(e["ts"] for e in events)
    for i, (run_id, run_events) in enumerate(by_run(events).items()):
        times = [e["ts"] for e in run_events]
        assert times == sorted(times) and len(set(times)) == len(times), run_id
        assert run_events[0]["type"] == "run_start" and run_events[-1]["type"] == "run_end"
        assert [int(e["event_id"].rsplit(":", 1)[1]) for e in run_events] == list(range(len(run_events)))
    starts = [e["ts"] for e in events if e["type"] == "run_start"]
    assert starts == [tb.EPOCH_MS + 60_000 * i for i in range(200)]
    for event in events:
        if event["type"] == "llm_call":
            assert event["latency_ms"] == 400 + 15 * event["output_tokens"]


def test_run_ids(runs, events):
    ids = {e["run_id"] for e in events}
    assert ids == {f"tau-airline-{r['task_id']}-{r['trial']}" for r in runs}
    assert len(ids) == 200


# --- determinism and output --------------------------------------------------------------


def test_deterministic(events, tmp_path):
    again = tb.import_runs(DATA)
    assert again == events
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    assert tb.write_jsonl(events, a) == len(events)
    tb.write_jsonl(again, b)
    assert a.read_bytes() == b.read_bytes()
    assert [orjson.loads(line) for line in a.read_bytes().splitlines()] == events


def test_cli(tmp_path, capsys):
    out = tmp_path / "events.jsonl"
    assert tb.main([str(DATA), "--out", str(out)]) == 0
    line = capsys.readouterr().out.strip()
    assert "\n" not in line
    assert "runs=200 events=4018 successes=84" in line and "tool_calls=1164" in line
    assert len(out.read_bytes().splitlines()) == 4018


# --- cost --------------------------------------------------------------------------------


def test_cost_per_successful_task(events):
    costs = tb.expected_cost(events)
    llm = [e for e in events if e["type"] == "llm_call"]
    assert set(costs) == {e["event_id"] for e in llm}
    # gpt-4o in genai-prices: $2.50 per million input tokens, $10 per million output tokens
    for event in llm[:50]:
        expected = (Decimal(event["input_tokens"]) * Decimal("2.5") + Decimal(event["output_tokens"]) * 10) / 10**6
        assert costs[event["event_id"]] == expected
    total = sum(costs.values(), Decimal(0))
    per_success = total / 84
    summary = tb.summary(events)
    assert summary["cost_usd"] == total and summary["cost_per_success_usd"] == per_success
    assert Decimal("15") < total < Decimal("25")
    assert Decimal("0.15") < per_success < Decimal("0.30")


# --- loops -------------------------------------------------------------------------------


def test_no_run_repeats_a_call_three_times_in_a_row(events):
    # Every repeated call in this file has other tool calls (mostly `think`) between repeats.
    assert tb.loop_findings(events) == {}
    pairs = tb.loop_findings(events, repeats=2)
    assert sorted(pairs) == ["tau-airline-13-0", "tau-airline-13-1", "tau-airline-13-3", "tau-airline-15-1", "tau-airline-17-1"]


def test_loops_when_think_does_not_count_as_progress(events):
    found = tb.loop_findings(events, ignore_tools=["think"])
    assert {run: [(f["tool"], f["repeats"]) for f in fs] for run, fs in found.items()} == {
        "tau-airline-8-1": [("book_reservation", 3)],
        "tau-airline-9-2": [("book_reservation", 4)],
    }


def test_runs_that_repeat_a_call_three_times(events):
    found = tb.repeated_calls(events)
    assert {run: sorted((f["tool"], f["repeats"]) for f in fs) for run, fs in found.items()} == {
        "tau-airline-8-1": [("book_reservation", 3)],
        "tau-airline-9-2": [("book_reservation", 4), ("think", 3)],
        "tau-airline-11-2": [("book_reservation", 3)],
        "tau-airline-13-0": [("update_reservation_flights", 3)],
    }


def test_loop_rules_on_a_made_up_sequence():
    def call(n, tool, **args):
        return {"event_id": f"r:{n}", "ts": n, "type": "tool_call", "run_id": "r", "tool": tool, "args": args}

    def llm(n):
        return {"event_id": f"r:{n}", "ts": n, "type": "llm_call", "run_id": "r"}

    seq = [call(0, "a", x=1, y=2), llm(1), call(2, "a", y=2, x=1), llm(3), call(4, "a", x=1, y=2),
           call(5, "b"), call(6, "a", x=1, y=2), call(7, "a", x=1, y=2)]
    found = tb.loop_findings(list(reversed(seq)))  # input order does not matter
    assert found == {"r": [{"tool": "a", "args": '{"x":1,"y":2}', "repeats": 3, "event_ids": ["r:0", "r:2", "r:4"]}]}
    assert tb.loop_findings(seq, repeats=4) == {}
    assert tb.loop_findings(seq, repeats=4, ignore_tools=["b"])["r"][0]["repeats"] == 5
    assert tb.repeated_calls(seq)["r"][0]["repeats"] == 5
