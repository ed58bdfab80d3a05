"""How fast a control reaches the agent: an agent on the client (streams/client.py) loops, or runs
over its cost envelope, and is stopped; measured idle and with other traffic.

    python -m jobs.bench_controls [--trials 20] [--step-ms 1000] [--load 10000]

Each trial is one run of an agent that takes a step every `--step-ms` (a model call's time) and
checks for controls before each step:
- loop: three identical tool calls; measured from the third call's publish to `RunStopped`
  in the agent, and the steps it took after the third call;
- budget: every model call reports $1 against the default envelope of $5 a run; measured the
  dollars reported after the call that crossed it.
Then the same with `--load` events/s of a simulated fleet published beside it (jobs.soak's
publisher). Prints p50 / p99 and the worst case of each.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from jobs.bench import _quantile, start_up, up_env
from jobs.soak import Publisher
from streams.client import RunStopped, Trackside
from streams.ops.broker import free_port
from streams.settings import Settings

STOP_WAIT_S = 30.0  # a trial whose stop never comes is reported as such, not waited for longer


def loop_trial(client: Trackside, step_s: float) -> tuple[float, int]:
    """(ms from the third identical call to RunStopped, steps after the third call)."""
    run = client.start_run()
    third = 0.0
    steps_after = 0
    try:
        for step in range(int(STOP_WAIT_S / step_s) + 3):
            run.check()
            if step >= 3:
                steps_after += 1
            run.llm_call(model="gpt-4o-mini", provider="openai", input_tokens=400, output_tokens=20)
            run.tool_call("search", args={"q": "the same question"})
            if step == 2:
                third = time.perf_counter()
            _step(run, step_s)
    except RunStopped:
        return (time.perf_counter() - third) * 1000, steps_after
    finally:
        run.end("aborted")
    return float("nan"), steps_after


def budget_trial(client: Trackside, step_s: float) -> float:
    """Dollars the run reported after the model call that took it over its $5 envelope."""
    run = client.start_run()
    spent = 0.0
    try:
        for step in range(int(STOP_WAIT_S / step_s) + 6):
            run.check()
            run.llm_call(model="gpt-4o", provider="openai", input_tokens=1000, output_tokens=100, cost_usd=1.0)
            run.tool_call("lookup", args={"step": step})  # progress: no loop
            spent += 1.0
            _step(run, step_s)
    except RunStopped:
        return max(0.0, spent - 6.0)  # the sixth dollar crossed $5
    finally:
        run.end("aborted")
    return float("nan")


def _step(run, seconds: float) -> None:  # noqa: ANN001
    """The agent's own work between two steps (a model call's time): it checks for controls
    meanwhile, as an agent whose calls are cancellable would."""
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        if run.client.stopped(run.run_id) is not None:
            return
        time.sleep(0.005)


def phase(client: Trackside, trials: int, step_s: float) -> dict[str, list[float]]:
    loops = [loop_trial(client, step_s) for _ in range(trials)]
    return {"latency": [ms for ms, _ in loops], "steps": [float(steps) for _, steps in loops],
            "dollars": [budget_trial(client, step_s) for _ in range(trials)]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--step-ms", type=float, default=1000.0)
    parser.add_argument("--load", type=float, default=10_000.0, help="events/s of other traffic in the second phase")
    args = parser.parse_args(argv)
    console = Console()
    data_dir = Path(tempfile.mkdtemp(prefix="trackside-bench-controls-"))
    port = free_port()
    env = up_env(data_dir, port, 1, 4)
    settings = Settings(data_dir=data_dir, embedded_port=port, partitions=4)
    up = start_up(env, settings, data_dir / "up.log")
    results = {}
    try:
        client = Trackside(f"127.0.0.1:{port}", "bench-bot", "v1")
        step_s = args.step_ms / 1000
        console.print(f"idle: {args.trials} loop trials and {args.trials} budget trials, a step every {args.step_ms:.0f} ms")
        results["idle"] = phase(client, args.trials, step_s)
        # other traffic for about as long as the phase takes (a trial is ~12 steps)
        publisher = Publisher(f"127.0.0.1:{port}", args.load, args.trials * 14 * step_s + 60, seed=5)
        began = time.monotonic()
        publisher.start()
        console.print(f"with {args.load:,.0f} events/s of other traffic")
        loaded = phase(client, args.trials, step_s)
        achieved = publisher.published / (time.monotonic() - began)
        results[f"{achieved:,.0f} events/s published beside"] = loaded
        client.close()
    finally:
        up.terminate()
        up.wait(300)
        shutil.rmtree(data_dir, ignore_errors=True)
    table = Table(title=f"Controls at the agent ({args.trials} trials each, a step every {args.step_ms:.0f} ms)")
    for column in ("traffic", "looping call -> RunStopped p50 / p99 / max (ms)", "steps after the 3rd call (max)",
                   "$ after the envelope (max)", "stops missing"):
        table.add_column(column, justify="right")
    for name, found in results.items():
        latency = found["latency"]
        missing = sum(value != value for value in latency + found["dollars"])
        table.add_row(name, f"{_quantile(latency, 0.5):,.0f} / {_quantile(latency, 0.99):,.0f} / "
                            f"{max(v for v in latency if v == v):,.0f}",
                      f"{max(found['steps']):.0f}", f"{max(v for v in found['dollars'] if v == v):.0f}", str(missing))
    console.print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
