"""How much state the faust worker holds at a fleet's pace, and where: without a broker.

    python -m jobs.bench_worker_state [--rate 600] [--minutes 40] [--partitions 4] [--every 10]

The soak's simulated fleet (`jobs.soak.fleet`: event times one after the other, `--rate`
events a second) goes through the processors' per-partition state machines as the faust agents
pass them their messages: an assembler partition per run partition, each closed run to the
metrics partition of its agent, failed runs and tenant costs on to the partitions that own
them. Event time is the clock (the worker's wall clock is the event time in the soak), so an
hour of it takes minutes. Every minute of event time: the memory Python has allocated and still
holds (tracemalloc, one frame), the process's RSS; every ten minutes (`--every`) the allocation
sites that grew most since the last snapshot. At the end the soak's verdict on this memory: peak
over the last half against the second quarter. tracemalloc slows the state machines ~2x and its snapshots
add to the RSS: read the traced figures, not the RSS, for the state.

The worker at the soak's 5,000 events/s holds about `5000 / rate` times the figures that grow
with the runs (the canary analyses' 5,000 recent runs an agent do not).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
import tracemalloc
import zlib
from collections import defaultdict

import orjson

from jobs.soak import fleet
from streams.contracts.events import parse
from streams.contracts.messages import EventBatch, decode_run_result, pack
from streams.detect.policy import Policy
from streams.ingest.pricing import PriceTable, price_event
from streams.processors.assembler import AssemblerPartition
from streams.processors.metrics import MetricsPartition, MetricsState
from streams.runtime import resident_bytes
from streams.settings import Settings

MINUTE_MS = 60_000


def _rss_mb() -> float:
    return (resident_bytes(os.getpid()) or 0) / 2**20


def _priced(prices: PriceTable, raw: dict) -> dict:
    """An event as the ingest stage hands it over: validated and priced."""
    event = parse(orjson.dumps(raw))
    price_event(prices, event)
    return event


class Pipeline:
    """The per-partition state machines of one worker that holds every partition."""

    def __init__(self, settings: Settings, start_ms: int) -> None:
        policy = Policy()
        partitions = range(settings.partitions)
        self.partitions = settings.partitions
        self.assemblers = {p: AssemblerPartition(p, settings, policy, [], set(), now_ms=start_ms) for p in partitions}
        self.analysts = {p: MetricsPartition(p, settings, policy, MetricsState(), start_ms) for p in partitions}
        self.pending: dict[int, list[dict]] = defaultdict(list)
        self.runs = 0

    def add(self, event: dict) -> None:
        self.pending[zlib.crc32(event["run_id"].encode()) % self.partitions].append(event)

    def flush(self, now_ms: int) -> None:
        """Each partition's events as one batch; everything they set off, through to the end."""
        messages = []
        for partition, events in self.pending.items():
            out = self.assemblers[partition].handle(EventBatch(partition, [pack(e) for e in events]), now_ms, now_ms,
                                                    now_ms / 1000)
            self.runs += len(out.closed)
            messages += [(target, result.encode()) for target, result in out.results.items()]
        self.pending.clear()
        while messages:  # encoded and decoded, as they travel
            target, value = messages.pop()
            out = self.analysts[target].handle(decode_run_result(value), now_ms, now_ms)
            messages += [(t, m.encode()) for t, m in [*out.tenant_costs.items(), *out.failed_runs.items()]]


def run(rate: float, minutes: int, partitions: int, top: int = 12, seed: int = 11, every: int = 10) -> dict:
    settings = Settings(partitions=partitions)
    start_ms = (int(time.time() * 1000) // MINUTE_MS) * MINUTE_MS
    prices = PriceTable()
    # Imports the detectors make on first use (scipy, scikit-learn) are not state: a throwaway
    # pipeline makes them before the tracing starts.
    warm = Pipeline(settings, start_ms - 10 * MINUTE_MS)
    for raw in fleet(rate, 20, start_ms - 10 * MINUTE_MS, seed + 1000):
        warm.add(_priced(prices, raw))
    warm.flush(start_ms - 9 * MINUTE_MS)
    del warm
    pipeline = Pipeline(settings, start_ms)
    gc.collect()
    tracemalloc.start(1)
    base = tracemalloc.get_traced_memory()[0]
    samples: list[tuple[int, int, float, float]] = []  # (minute, runs closed, traced MB, RSS MB)
    snapshot = None
    began = time.perf_counter()
    flushed, next_minute, events = start_ms, start_ms + MINUTE_MS, 0
    for raw in fleet(rate, minutes * 60, start_ms, seed):
        if raw["ts"] >= flushed + 1000:  # a batch a second of event time
            flushed = raw["ts"]
            pipeline.flush(flushed)
        while raw["ts"] >= next_minute:
            minute = (next_minute - start_ms) // MINUTE_MS
            gc.collect()
            traced = (tracemalloc.get_traced_memory()[0] - base) / 2**20
            samples.append((minute, pipeline.runs, traced, _rss_mb()))
            print(f"  minute {minute:>3}: {events:>10,} events, {pipeline.runs:>8,} runs closed, state "
                  f"{traced:7.1f} MB (RSS {samples[-1][3]:6.0f} MB), {time.perf_counter() - began:5.0f} s", flush=True)
            if minute % every == 0:
                now = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
                if snapshot is not None:
                    print(f"  grew most since minute {minute - every}:")
                    for stat in now.compare_to(snapshot, "lineno")[:top]:
                        frame = stat.traceback[0]
                        print(f"    {stat.size_diff / 2**20:+7.2f} MB  {stat.size / 2**20:7.2f} MB  "
                              f"{frame.filename.rsplit('/', 3)[-1] if 'site-packages' not in frame.filename else frame.filename.split('site-packages/')[1]}:{frame.lineno}")
                snapshot = now
            next_minute += MINUTE_MS
        pipeline.add(_priced(prices, raw))
        events += 1
    tracemalloc.stop()

    def peak(lo: float, hi: float) -> float:
        return max((s[2] for s in samples if lo < s[0] <= hi), default=0.0)

    second_quarter, second_half = peak(minutes / 4, minutes / 2), peak(minutes / 2, minutes)
    return {"events": events, "runs": pipeline.runs, "samples": samples, "peak_second_quarter_mb": second_quarter,
            "peak_second_half_mb": second_half, "wall_s": time.perf_counter() - began}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=600.0, help="events a second of event time")
    ap.add_argument("--minutes", type=int, default=40, help="minutes of event time")
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--top", type=int, default=12, help="allocation sites shown at each snapshot")
    ap.add_argument("--every", type=int, default=10, help="minutes of event time between snapshots")
    args = ap.parse_args(argv)
    print(f"the soak's fleet at {args.rate:,.0f} events/s for {args.minutes} minutes of event time, "
          f"{args.partitions} partitions")
    result = run(args.rate, args.minutes, args.partitions, args.top, every=args.every)
    quarter, half = result["peak_second_quarter_mb"], result["peak_second_half_mb"]
    print(f"{result['events']:,} events, {result['runs']:,} runs closed in {result['wall_s']:.0f} s; state peak "
          f"{quarter:.1f} MB over minutes {args.minutes / 4:g}-{args.minutes / 2:g}, {half:.1f} MB over "
          f"{args.minutes / 2:g}-{args.minutes}: x{half / quarter:.2f}" if quarter else "too short for a verdict")
    return 0


if __name__ == "__main__":
    sys.exit(main())
