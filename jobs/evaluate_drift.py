"""Quality of DriftDetector on simulated fleets over several seeds: false alerts on stable traffic,
detection delay of real shifts (cost x2, success 0.85 -> 0.5, a new tool, a bad canary)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections import defaultdict
from dataclasses import dataclass

from scipy import stats

from streams.detect.drift import DriftDetector
from jobs.simulate import (DEFAULT_START_MS, HOUR_MS, AgentSpec, CanarySpec, FleetConfig, default_agents,
                           genai_prices_fn, simulate)

WINDOW_MS = 300_000
SPAN_MS = 3 * HOUR_MS
SHIFT_AT_MS = 120 * 60_000  # from the start; a window boundary, so the shift's first full window starts there
RUNS_PER_SPAN = 1200  # ~2.7 runs/min for support-bot v1.4.2, 1.7 research, 1.0 coder 0.9.3, 0.7 the others
IDLE_TIMEOUT_MS = 1_800_000  # the run assembler's: a timed-out run's row appears this long after its last event


def runs_from_events(events) -> list[dict]:
    """Closed-run rows (as the runs table holds them) from simulator events."""
    acc: dict[str, dict] = {}
    for ev in events:
        r = acc.get(ev["run_id"])
        if r is None:
            r = acc[ev["run_id"]] = {
                "run_id": ev["run_id"], "agent_id": ev["agent_id"], "agent_version": ev["agent_version"],
                "first": ev["ts"], "last": ev["ts"], "end": None, "outcome": "timeout", "error_type": "",
                "cost_usd": 0.0, "input_tokens": 0, "output_tokens": 0, "llm_calls": 0, "tool_calls": 0,
                "tool_errors": 0, "tools": []}
        r["first"], r["last"] = min(r["first"], ev["ts"]), max(r["last"], ev["ts"])
        kind = ev["type"]
        if kind == "llm_call":
            r["llm_calls"] += 1
            r["input_tokens"] += ev["input_tokens"]
            r["output_tokens"] += ev["output_tokens"]
            r["cost_usd"] += ev.get("cost_usd") or 0.0
        elif kind == "tool_call":
            r["tool_calls"] += 1
            r["tool_errors"] += ev["status"] != "ok"
            r["tools"].append((ev["ts"], len(r["tools"]), ev["tool"]))
        elif kind == "run_end":
            r["end"] = ev["ts"]
            r["outcome"] = ev["outcome"]
            r["error_type"] = ev.get("error_type") or ""
    rows = []
    for r in acc.values():
        ended = r["end"] if r["end"] is not None else r["last"]
        rows.append({
            "run_id": r["run_id"], "agent_id": r["agent_id"], "agent_version": r["agent_version"],
            "ended_at": ended, "outcome": r["outcome"], "cost_usd": r["cost_usd"],
            "input_tokens": r["input_tokens"], "output_tokens": r["output_tokens"],
            "steps": r["llm_calls"] + r["tool_calls"], "llm_calls": r["llm_calls"], "tool_calls": r["tool_calls"],
            "tool_errors": r["tool_errors"], "duration_ms": ended - r["first"],
            "tool_path": [t for _, _, t in sorted(r["tools"])], "error_type": r["error_type"],
            "loop_detected": False,
            # when the row reaches the detector: timed-out runs close an idle timeout later
            "_arrival": ended if r["end"] is not None else ended + IDLE_TIMEOUT_MS,
        })
    return rows


def _fleet(seed: int, agents, start: int, duration: int, runs: int, canary: CanarySpec | None = None,
           fast_prices: bool = False) -> list[dict]:
    cfg = FleetConfig(seed=seed, runs=runs, start_ms=start, duration_ms=duration, agents=agents, canary=canary,
                      price_fn=linear_price if fast_prices else genai_prices_fn, cost_fraction=1.0)
    return runs_from_events(simulate(cfg))


def linear_price(model: str, provider: str, inp: int, out: int, cached: int) -> float:
    # a stand-in for genai-prices when speed matters (tests): per-million-token list prices
    per_in, per_out = {"gpt-4o": (2.5, 10), "gpt-4o-mini": (0.15, 0.6), "claude-sonnet-4-5": (3, 15),
                       "claude-haiku-4-5": (1, 5)}.get(model, (1, 5))
    return ((inp - cached) * per_in + cached * per_in * 0.1 + out * per_out) / 1e6


def _with_version(agents, agent_id: str, version: str, **changes) -> tuple[AgentSpec, ...]:
    out = []
    for a in agents:
        if a.agent_id == agent_id:
            if "path" in changes:
                a = dataclasses.replace(a, path=changes.pop("path"))
            a = dataclasses.replace(a, versions=tuple(
                dataclasses.replace(v, **changes) if v.version == version else v for v in a.versions))
        out.append(a)
    return tuple(out)


@dataclass(frozen=True)
class Scenario:
    name: str
    target: tuple[str, str] | None  # the (agent, version) that shifts at SHIFT_AT_MS; None: stable
    after: dict | None = None  # VersionSpec (or path) changes of the target from SHIFT_AT_MS
    canary: CanarySpec | None = None
    single_version: bool = False  # support-bot with v1.4.2 only (canary scenarios)
    lasts_ms: int | None = None  # the shift ends after this long (a blip); None: it stays

    @property
    def success_shift(self) -> bool:
        """The shift is a success-rate change: the oracle (success_oracle) has something to say."""
        return self.after is not None and "success_rate" in self.after

    def detector(self, **params) -> DriftDetector:
        """A detector as the pipeline runs one here: a canary is compared with the stable version."""
        return DriftDetector(baseline_version=dict([SUPPORT]) if self.canary else None, **params)

    def runs(self, seed: int, fast_prices: bool = False, runs_per_span: int = RUNS_PER_SPAN) -> list[dict]:
        agents = default_agents()
        if self.single_version:
            agents = tuple(dataclasses.replace(a, versions=a.versions[:1]) if a.agent_id == "support-bot" else a
                           for a in agents)
        start = DEFAULT_START_MS
        if self.after is None:
            return _fleet(seed, agents, start, SPAN_MS, runs_per_span, self.canary, fast_prices)
        # a shift within one version: fleets back to back, the shifted one with the changed spec
        changed = _with_version(agents, self.target[0], self.target[1], **self.after)
        end = SHIFT_AT_MS + (self.lasts_ms or SPAN_MS - SHIFT_AT_MS)
        parts = [(0, SHIFT_AT_MS, agents), (SHIFT_AT_MS, end, changed), (end, SPAN_MS, agents)]
        return [run for i, (a, b, spec) in enumerate(parts) if b > a
                for run in _fleet(seed + 10_007 * i, spec, start + a, b - a, runs_per_span * (b - a) // SPAN_MS,
                                  None, fast_prices)]


SUPPORT = ("support-bot", "v1.4.2")
NEW_TOOL_PATH = (("get_customer", 0, 1), ("lookup_order", 1, 2), ("web_search", 0, 1), ("refund", 0, 1),
                 ("send_email", 0, 1))

SCENARIOS = {
    "stable": Scenario("stable", None),
    "cost_x2": Scenario("cost_x2", SUPPORT, {"cost_multiplier": 2.0}),
    "success_0.5": Scenario("success_0.5", SUPPORT, {"success_rate": 0.5}),
    "new_tool": Scenario("new_tool", SUPPORT, {"path": NEW_TOOL_PATH}),
    "blip_cost_x3": Scenario("blip_cost_x3", SUPPORT, {"cost_multiplier": 3.0}, lasts_ms=WINDOW_MS),
    "cost_x2_research": Scenario("cost_x2_research", ("research-agent", "2.3.0"), {"cost_multiplier": 2.0}),
    "success_0.35_coder": Scenario("success_0.35_coder", ("coder", "0.9.3"), {"success_rate": 0.35}),
    "canary_bad": Scenario("canary_bad", ("support-bot", "v1.6.0-rc1"), canary=CanarySpec(
        "support-bot", "v1.6.0-rc1", share=0.3, success_rate=0.6, cost_multiplier=1.5,
        start_ms=DEFAULT_START_MS + SHIFT_AT_MS), single_version=True),
    "canary_same": Scenario("canary_same", None, canary=CanarySpec(
        "support-bot", "v1.6.0-rc1", share=0.3, start_ms=DEFAULT_START_MS + SHIFT_AT_MS), single_version=True),
}


def replay(detector: DriftDetector, runs: list[dict], batch_ms: int = 60_000) -> tuple[list, list, float, int]:
    """Feed runs in arrival order, one batch per `batch_ms` of event time; (rows, alerts, seconds, tests)."""
    batches = defaultdict(list)
    for r in runs:
        batches[r["_arrival"] // batch_ms].append(r)
    rows, alerts, spent = [], [], 0.0
    for b in sorted(batches):
        t = time.perf_counter()
        out = detector.update(batches[b])
        spent += time.perf_counter() - t
        rows += out[0]
        alerts += out[1]
    t = time.perf_counter()
    out = detector.flush()
    spent += time.perf_counter() - t
    tests = len({(r["agent_id"], r["agent_version"], r["window"]) for r in rows + out[0]})
    return rows + out[0], alerts + out[1], spent, tests


def score(scenario: Scenario, alerts: list[dict], persistence: int) -> dict:
    """False alerts, and the target's detection delay in windows beyond what persistence allows.

    W0 is the first window that starts at or after the shift (SHIFT_AT_MS is a boundary, so the
    first full window of shifted traffic). The earliest possible alert is the test of window
    W0 + persistence - 1; delay = alert window - that, in windows (0 = as early as possible).
    """
    shift = DEFAULT_START_MS + SHIFT_AT_MS
    firing = [a for a in alerts if a["status"] == "firing"]
    hits = [a for a in firing if scenario.target and (a["agent_id"], a["agent_version"]) == scenario.target
            and a["evidence"]["window"] >= shift]
    affected = {scenario.target[0]} if scenario.name == "new_tool" else set()  # its path is agent-wide
    false = [a for a in firing if a not in hits and a["agent_id"] not in affected]
    out = {"false_alerts": len(false), "false": [(a["agent_id"], a["agent_version"], a["evidence"]["window"])
                                                 for a in false]}
    if scenario.target:
        if hits:
            first = min(hits, key=lambda a: a["evidence"]["window"])
            idx = (first["evidence"]["window"] - shift) // WINDOW_MS
            out.update(delay=idx - (persistence - 1), features=[m["feature"] for m in first["evidence"]["features"]],
                       severity=first["severity"], summary=first["summary"])
        else:
            out.update(delay=None)
    return out


def success_oracle(scenario: Scenario, runs: list[dict], windows: int = 4) -> float:
    """What the data allows: the smallest p-value of a test that knows where the shift starts and
    looks at the success rate alone, one-sided (Fisher's exact test) on the target's runs from
    W0 to the end of each of W0+1 .. W0+windows-1 against its runs of the 2 h before. Runs that
    reach a detector too late for their window (timed out) are left out, as the detector must."""
    shift = DEFAULT_START_MS + SHIFT_AT_MS
    mine = [r for r in runs if (r["agent_id"], r["agent_version"]) == scenario.target and r["_arrival"] == r["ended_at"]]
    before = [r["outcome"] == "success" for r in mine if r["ended_at"] < shift]
    best = 1.0
    for w in range(2, windows + 1):
        after = [r["outcome"] == "success" for r in mine if shift <= r["ended_at"] < shift + w * WINDOW_MS]
        table = [[len(after) - sum(after), sum(after)], [len(before) - sum(before), sum(before)]]
        best = min(best, float(stats.fisher_exact(table, alternative="greater").pvalue))
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--first-seed", type=int, default=1)
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--alpha", type=float, default=None)
    ap.add_argument("--min-samples", type=int, default=None)
    ap.add_argument("--consistency-alpha", type=float, default=None)
    ap.add_argument("--runs-per-span", type=int, default=RUNS_PER_SPAN, help="runs of the whole fleet per 3 h")
    ap.add_argument("--fast-prices", action="store_true", help="a linear price table instead of genai-prices")
    ap.add_argument("-v", "--verbose", action="store_true", help="print each first alert's summary")
    args = ap.parse_args(argv)
    params = {k: v for k, v in (("alpha", args.alpha), ("min_samples", args.min_samples),
                                ("consistency_alpha", args.consistency_alpha)) if v is not None}
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    spent_all = tests_all = batches_all = 0
    print(f"{SPAN_MS // HOUR_MS} h of event time, {WINDOW_MS // 60_000}-min windows, {args.runs_per_span} runs per 3 h, "
          f"shift at +{SHIFT_AT_MS // 60_000} min, seeds {seeds.start}..{seeds.stop - 1}, params {params or 'default'}")
    print("delay = windows between the earliest alert persistence allows (test of W0 + persistence - 1, "
          "W0 = first window starting at/after the shift) and the alert; bar: delay <= 2")
    for name in args.scenarios.split(","):
        sc = SCENARIOS[name]
        delays, false_total, significant, tested, lines, oracle = [], 0, 0, 0, [], []
        per_version: dict[str, int] = defaultdict(int)
        for seed in seeds:
            det = sc.detector(**params)
            runs = sc.runs(seed, args.fast_prices, args.runs_per_span)
            if sc.success_shift:
                oracle.append(success_oracle(sc, runs))
            rows, alerts, spent, tests = replay(det, runs)
            spent_all += spent
            tests_all += tests
            batches_all += len({r["_arrival"] // 60_000 for r in runs})
            tested += tests
            for agent, version, _ in {(r["agent_id"], r["agent_version"], r["window"]) for r in rows}:
                per_version[f"{agent} {version}"] += 1
            significant += len({(r["agent_id"], r["agent_version"], r["window"]) for r in rows if r["significant"]})
            res = score(sc, alerts, det.persistence)
            false_total += res["false_alerts"]
            delays.append(res.get("delay"))
            if res["false"] or args.verbose:
                lines.append(f"  seed {seed}: false alerts {res['false']} delay={res.get('delay')} "
                             f"{res.get('severity', '')} {res.get('features', '')}")
            if args.verbose and res.get("summary"):
                lines.append(f"    {res['summary']}")
        head = f"{name:20s} false alerts {false_total}/{len(seeds)} seeds; significant windows {significant}/{tested}"
        if sc.target is not None:
            within = sum(d is not None and d <= 2 for d in delays)
            shown = ["-" if d is None else d for d in delays]
            head += f"; {sc.target[0]} {sc.target[1]} within bar {within}/{len(seeds)}, delay per seed {shown}"
        print(head)
        if oracle:
            print("  oracle (knows W0, success rate alone, one-sided, by W0+3): p <= 1e-5 in "
                  f"{sum(p <= 1e-5 for p in oracle)}/{len(oracle)}, p <= 1e-4 in {sum(p <= 1e-4 for p in oracle)}, "
                  f"p <= 1e-3 in {sum(p <= 1e-3 for p in oracle)}")
        if sc.target is None:
            print("  tested windows: " + ", ".join(f"{k} {v}" for k, v in sorted(per_version.items())))
        if lines:
            print("\n".join(lines))
    print(f"runtime: {1000 * spent_all / max(tests_all, 1):.2f} ms per (version, window) test, "
          f"{1000 * spent_all / max(batches_all, 1):.2f} ms per 1-min update batch ({tests_all} tests)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
