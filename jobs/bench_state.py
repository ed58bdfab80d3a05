"""How much memory the run assembler's state takes, and that it stays bounded.

    python -m jobs.bench_state [--runs 100000] [--hours 10]

1. 100k runs open at once (a run_start and an llm_call each): bytes per open run, then the
   watermark passes their idle timeout: every run closes as `timeout`, is kept another idle
   sixth of the idle timeout whole and then as a tombstone for late events, and is forgotten; the
   memory goes back.
2. Runs that never end, for hours of event time: a steady stream of runs of which a share
   never sends run_end; the open runs plateau at about rate x idle timeout, and so does the
   memory (peak of the second half vs the first).

Memory is what tracemalloc sees allocated by Python (the state), plus the process RSS.
"""

from __future__ import annotations

import argparse
import gc
import resource
import sys
import time
import tracemalloc

from streams.detect.runs import RunAssembler

T0 = 1_793_491_200_000
IDLE_MS = 30 * 60_000


def _event(run: int, n: int, ts: int, kind: str = "llm_call") -> dict:
    event = {
        "event_id": f"r{run}-{n}", "run_id": f"r{run}", "ts": ts, "type": kind, "agent_id": f"agent-{run % 7}",
        "agent_version": "v1", "task_id": "", "session_id": "", "tenant": "acme", "environment": "prod",
        "model": "gpt-4o-mini", "provider": "openai", "input_tokens": 800, "output_tokens": 120,
        "cache_read_input_tokens": 0, "status": "ok", "error_type": "", "error_message": "", "cost_usd": 0.0005,
        "cost_source": "price_table", "latency_ms": 900, "outcome": "success", "score": None,
        "tool": "", "args_hash": "", "policy": "", "decision": "", "wait_ms": None,  # normalised: every field
    }
    return event


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def concurrent_runs(runs: int) -> dict:
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    assembler = RunAssembler(IDLE_MS)
    began = time.perf_counter()
    batch = []
    for run in range(runs):
        ts = T0 + run  # all within two minutes of event time: all open together
        batch += [_event(run, 0, ts, "run_start"), _event(run, 1, ts + 1)]
        if len(batch) >= 20_000:
            assembler.apply(batch, 0)
            batch = []
    assembler.apply(batch, 0)
    apply_s = time.perf_counter() - began
    open_runs = len(assembler.open)
    held = tracemalloc.get_traced_memory()[0] - base
    # one event far in the future moves the watermark past every idle timeout, twice
    timed_out = len(assembler.apply([_event(runs, 0, T0 + 2 * IDLE_MS + 10 * 60_000, "run_start")], 0))
    after_close = (len(assembler.open), len(assembler.closed))
    del batch
    assembler.apply([_event(runs + 1, 0, T0 + 4 * IDLE_MS + 20 * 60_000, "run_start")], 0)
    gc.collect()
    after = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    return {"open_runs": open_runs, "bytes_per_open_run": held / open_runs, "held_mb": held / 2**20,
            "timed_out_rows": timed_out, "open_closed_after_timeout": after_close,
            "open_closed_after_forget": (len(assembler.open), len(assembler.closed)), "after_mb": after / 2**20,
            "events_per_s": 2 * runs / apply_s}


def endless(hours: int, runs_per_min: int = 200, never_end: float = 0.1) -> dict:
    """A stream where `never_end` of the runs never send run_end."""
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    assembler = RunAssembler(IDLE_MS)
    samples = []
    run = 0
    for minute in range(hours * 60):
        batch = []
        for _ in range(runs_per_min):
            ts = T0 + minute * 60_000 + (run % 60) * 1000
            batch += [_event(run, 0, ts, "run_start"), _event(run, 1, ts + 500)]
            if run % round(1 / never_end) != 0:
                batch.append(_event(run, 2, ts + 1000, "run_end"))
            run += 1
        assembler.apply(batch, 0)
        if minute % 10 == 9:
            samples.append((minute + 1, len(assembler.open), len(assembler.closed),
                            (tracemalloc.get_traced_memory()[0] - base) / 2**20))
    tracemalloc.stop()
    half = len(samples) // 2
    return {"runs": run, "samples": samples, "peak_first_half_mb": max(s[3] for s in samples[:half]),
            "peak_second_half_mb": max(s[3] for s in samples[half:]),
            "max_open": max(s[1] for s in samples), "max_closed_kept": max(s[2] for s in samples)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=100_000)
    ap.add_argument("--hours", type=int, default=10)
    args = ap.parse_args(argv)
    c = concurrent_runs(args.runs)
    print(f"{c['open_runs']:,} concurrent open runs: {c['held_mb']:.1f} MB of state, "
          f"{c['bytes_per_open_run']:,.0f} bytes per open run ({c['events_per_s']:,.0f} events/s applied)")
    print(f"  watermark past the idle timeout: {c['timed_out_rows']:,} rows closed as timeout; open/closed kept "
          f"{c['open_closed_after_timeout']}; after another idle timeout {c['open_closed_after_forget']}, "
          f"{c['after_mb']:.2f} MB held")
    e = endless(args.hours)
    print(f"{args.hours} h of event time, 200 runs/min, 10% never end ({e['runs']:,} runs): open runs at most "
          f"{e['max_open']:,}, closed runs kept at most {e['max_closed_kept']:,}; peak state "
          f"{e['peak_first_half_mb']:.1f} MB in the first half, {e['peak_second_half_mb']:.1f} MB in the second")
    for minute, open_runs, closed, mb in e["samples"][:: max(1, len(e["samples"]) // 8)]:
        print(f"  t+{minute:>4} min: open {open_runs:>6,}  closed kept {closed:>6,}  state {mb:6.1f} MB")
    print(f"process max RSS {_rss_mb():.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
