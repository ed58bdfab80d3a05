"""Failure clusters against the simulator's labelled failure families, over several seeds:
adjusted Rand index, clusters per family, labels, alerts and partial_fit speed."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import Counter, defaultdict

from sklearn.metrics import adjusted_rand_score, completeness_score, homogeneity_score

from streams.detect.failures import FIRING, FailureClusterer, is_failed
from jobs.simulate import DEFAULT_CANARY, CanarySpec, FleetConfig, run_labels, simulate

ERROR_SOURCES = ("ended_on", "last_failing", "run_end")


def assemble_runs(events, errors: str = "ended_on") -> list[dict]:
    """`runs` rows from simulated events, ordered by ended_at.

    The error is run_end's; without one, `errors` says where it comes from: "ended_on" takes the
    failing call the run ended on (the last tool call, or the last llm call, when it failed; a
    failure followed by a successful retry was transient), "last_failing" the last failing call
    whatever followed it, "run_end" nothing (what streams/detect/runs.py stores today).
    """
    by_run: dict[str, list[dict]] = defaultdict(list)
    for event in events:
        by_run[event["run_id"]].append(event)
    runs = []
    for run_id, evs in by_run.items():
        evs.sort(key=lambda e: e["ts"])
        end = next((e for e in evs if e["type"] == "run_end"), None)
        tools = [e for e in evs if e["type"] == "tool_call"]
        llms = [e for e in evs if e["type"] == "llm_call"]
        error_type, error_message = (end.get("error_type", ""), end.get("error_message", "")) if end else ("", "")
        if not error_type and errors != "run_end":
            if errors == "ended_on":
                candidates = [calls[-1] for calls in (tools, llms) if calls and calls[-1]["status"] != "ok"]
            else:
                candidates = [e for e in tools + llms if e["status"] != "ok"]
            if candidates:
                last = max(candidates, key=lambda e: e["ts"])
                error_type, error_message = last["error_type"], last["error_message"]
        runs.append({
            "run_id": run_id, "agent_id": evs[0]["agent_id"], "agent_version": evs[0]["agent_version"],
            "tenant": evs[0].get("tenant", ""), "started_at": evs[0]["ts"], "ended_at": end["ts"] if end else evs[-1]["ts"],
            "outcome": end["outcome"] if end else "timeout",
            "error_type": error_type, "error_message": error_message,
            "tool_path": [e["tool"] for e in tools],
            "tool_errors": sum(e["status"] != "ok" for e in tools),
            "loop_detected": _loops(tools),
        })
    runs.sort(key=lambda r: (r["ended_at"], r["run_id"]))
    return runs


def _loops(tools: list[dict], repeats: int = 3) -> bool:
    """The same tool with the same args `repeats` times in a row (streams/detect/loops.py's "repeat" rule)."""
    streak, last = 0, None
    for e in tools:
        key = (e["tool"], json.dumps(e.get("args"), sort_keys=True))
        streak = streak + 1 if key == last else 1
        last = key
        if streak >= repeats:
            return True
    return False


def scored(runs: list[dict], labels: dict[str, dict], timeouts: bool = False) -> list[tuple[str, tuple]]:
    """(run_id, true family) of the failed runs that are scored.

    A family is its name, fleet-wide: failure modes span agents, so the loops of every agent are
    one family (the simulator's other families each belong to one agent). Timeouts carry no
    family (the process died anywhere); with `timeouts` they are scored as one "timeout" family.
    """
    out = []
    for run in runs:
        if not is_failed(run):
            continue
        family = labels[run["run_id"]]["failure_family"]
        if family is None and timeouts and run["outcome"] == "timeout":
            family = "timeout"
        if family is not None:
            out.append((run["run_id"], (family,)))
    return out


def evaluate(seed: int, runs: int, errors: str = "ended_on", loop_flag: bool = True, tenant_words: bool = False,
             batch_ms: int = 60_000, **params) -> dict:
    cfg = FleetConfig(seed=seed, runs=runs)
    labels = run_labels(cfg)
    rows = assemble_runs(simulate(cfg), errors)
    for row in rows:
        row["loop_detected"] = row["loop_detected"] and loop_flag
        if tenant_words and row["error_message"]:
            # words no mask removes, differing between runs of one family
            row["error_message"] += f" while serving {row['tenant']} customers"
    model = FailureClusterer(**params)
    assigned, alerts = {}, []
    began = time.perf_counter()
    # batches cut by event time, as the stream delivers them
    batch, batch_end = [], None
    for row in rows + [None]:
        if row is None or (batch_end is not None and row["ended_at"] >= batch_end):
            _, new_alerts, got = model.update(batch)
            assigned.update(got)
            alerts += new_alerts
            batch = []
        if row is not None:
            batch_end = (row["ended_at"] // batch_ms + 1) * batch_ms if not batch else batch_end
            batch.append(row)
    elapsed = time.perf_counter() - began
    failed = sum(is_failed(r) for r in rows)

    result = {"seed": seed, "failed_runs": failed, "stream_runs_per_s": len(rows) / elapsed}
    for name, with_timeouts in (("ari", False), ("ari_with_timeouts", True)):
        pairs = scored(rows, labels, with_timeouts)
        truth = ["/".join(f) for _, f in pairs]
        pred = [assigned[r] for r, _ in pairs]
        result[name] = adjusted_rand_score(truth, pred)
        if not with_timeouts:
            result["homogeneity"] = homogeneity_score(truth, pred)
            result["completeness"] = completeness_score(truth, pred)
            result["families"] = len(set(truth))
            result["clusters"] = len(set(pred))
            sizes = Counter(pred)
            result["clusters_min3"] = sum(n >= 3 for n in sizes.values())
            result["singletons"] = sum(n == 1 for n in sizes.values())
            # the family each cluster mostly holds, to show labels against the truth
            majority = defaultdict(Counter)
            for t, p in zip(truth, pred):
                majority[p][t] += 1
            result["label_examples"] = sorted(
                ((model.clusters_[cid].size, majority[cid].most_common(1)[0][0], model.clusters_[cid].label)
                 for cid in majority), reverse=True)
    result["alerts"] = Counter(f"{a['evidence']['condition']}:{a['status']}" for a in alerts)
    return result


def fit_speed(seed: int, runs: int, repeat: int = 3) -> float:
    """Failed runs per second through partial_fit, in one batch (vectorising included)."""
    rows = [r for r in assemble_runs(simulate(FleetConfig(seed=seed, runs=runs))) if is_failed(r)]
    best = float("inf")
    for _ in range(repeat):
        began = time.perf_counter()
        FailureClusterer().partial_fit(rows)
        best = min(best, time.perf_counter() - began)
    return len(rows) / best


def spike_scenario(seed: int, runs: int = 2000) -> dict:
    """A canary that fails half its runs from mid-span: do support-bot's clusters spike after, and only after?"""
    canary = CanarySpec(DEFAULT_CANARY.agent_id, "v9.9.9-bad", share=0.5, success_rate=0.0)
    cfg = FleetConfig(seed=seed, runs=runs, canary=canary)
    rows = assemble_runs(simulate(cfg))
    start = cfg.start_ms + cfg.duration_ms // 2
    model = FailureClusterer()
    alerts = []
    for minute in range(0, cfg.duration_ms, 60_000):
        lo, hi = cfg.start_ms + minute, cfg.start_ms + minute + 60_000
        alerts += model.update([r for r in rows if lo <= r["ended_at"] < hi])[1]
    spikes = [a for a in alerts if a["evidence"]["condition"] == "spike" and a["status"] == FIRING
              and "window_versions" in a["evidence"]]
    before = [a for a in spikes if a["ts"] < start]
    after = [a for a in spikes if a["ts"] >= start]
    return {"seed": seed, "spikes_before": len(before), "spikes_after": len(after),
            "first_delay_min": (min(a["ts"] for a in after) - start) / 60_000 if after else None,
            "canary_version_named": sum(canary.version in a["evidence"]["window_versions"].get(canary.agent_id, {})
                                        for a in after)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 7, 11, 42])
    ap.add_argument("--runs", type=int, default=2000)
    ap.add_argument("--threshold", type=float, default=None)
    ap.add_argument("--sweep", action="store_true", help="mean ARI over a range of thresholds")
    args = ap.parse_args(argv)
    params = {} if args.threshold is None else {"threshold": args.threshold}

    results = [evaluate(seed, args.runs, **params) for seed in args.seeds]
    print(f"runs per seed: {args.runs}; scored: failed runs with a labelled family (timeouts left out)")
    print(f"{'seed':>5} {'failed':>6} {'ARI':>6} {'ARI+to':>6} {'homog':>6} {'compl':>6} "
          f"{'fams':>5} {'clus':>5} {'>=3':>4} {'single':>6}  alerts")
    for r in results:
        print(f"{r['seed']:>5} {r['failed_runs']:>6} {r['ari']:>6.3f} {r['ari_with_timeouts']:>6.3f} "
              f"{r['homogeneity']:>6.3f} {r['completeness']:>6.3f} {r['families']:>5} {r['clusters']:>5} "
              f"{r['clusters_min3']:>4} {r['singletons']:>6}  {dict(r['alerts'])}")
    print(f"mean ARI {statistics.mean(r['ari'] for r in results):.3f} "
          f"(min {min(r['ari'] for r in results):.3f}); with timeouts "
          f"{statistics.mean(r['ari_with_timeouts'] for r in results):.3f}")

    print("\nlargest clusters of seed", results[0]["seed"], "(size, majority family, label):")
    for size, family, label in results[0]["label_examples"][:16]:
        print(f"  {size:>4}  {family:<32} {label}")

    print("\nsensitivity (mean ARI over the seeds):")
    for name, kwargs in (("error from run_end only (streams/detect/runs.py today)", {"errors": "run_end"}),
                         ("error from last failing call, retried or not", {"errors": "last_failing"}),
                         ("no loop_detected flag", {"loop_flag": False}),
                         ("unmasked tenant name in every message", {"tenant_words": True})):
        ari = statistics.mean(evaluate(s, args.runs, **kwargs, **params)["ari"] for s in args.seeds)
        print(f"  {name:<50} {ari:.3f}")
    if args.sweep:
        for threshold in (0.4, 0.5, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95):
            for name, kwargs in (("", {}), ("(tenant words)", {"tenant_words": True}),
                                 ("(no loop flag)", {"loop_flag": False})):
                rs = [evaluate(s, args.runs, threshold=threshold, **kwargs) for s in args.seeds]
                print(f"  threshold {threshold:<4} {name:<15} ARI {statistics.mean(r['ari'] for r in rs):.3f}  "
                      f"min {min(r['ari'] for r in rs):.3f}  clusters {statistics.mean(r['clusters'] for r in rs):.1f}")

    print("\nspike scenario (canary failing all its runs, 50% share, from mid-span):")
    for seed in args.seeds:
        print("  ", spike_scenario(seed))
    print(f"\npartial_fit speed: {fit_speed(args.seeds[0], 20_000):,.0f} failed runs/s (one batch, 20k-run fleet)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
