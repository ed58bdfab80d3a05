"""An agent built on the client (streams/client.py), as an agent team would write one: it answers
support tickets with a scripted model and two tools, checks for controls before each step, and
stops a run when told to. One ticket in `--loop-every` makes the model ask for the same call
again and again, as a looping agent does; Trackside stops that run.

    python -m jobs.example_agent --bootstrap 127.0.0.1:9092 [--tickets 5] [--loop-every 3] [--step-ms 200]

Prints one line per run: its id, how it ended, and its steps.
"""

from __future__ import annotations

import argparse
import sys
import time

from streams.client import RunStopped, Trackside, VersionPaused

MAX_STEPS = 50  # the agent's own guard: it gives up a run after this many steps


def model(ticket: int, looping: bool, step: int) -> tuple[str, dict] | None:
    """The scripted model: the tool call it asks for at this step, or None when it answers."""
    if looping:
        return "lookup_order", {"order_id": f"A-{ticket}"}  # the same call, again and again
    plan = [("lookup_order", {"order_id": f"A-{ticket}"}), ("list_orders", {"page": 1}), ("list_orders", {"page": 2})]
    return plan[step] if step < len(plan) else None


def handle(trackside: Trackside, ticket: int, looping: bool, step_s: float) -> tuple[str, str, int]:
    steps = 0
    try:
        with trackside.run(task_id=f"ticket-{ticket}") as run:
            for step in range(MAX_STEPS):
                run.check()  # a stop_run for this run ends it here
                steps += 1
                time.sleep(step_s)  # the model thinks
                call = model(ticket, looping, step)
                run.llm_call(model="gpt-4o-mini", provider="openai", input_tokens=500 + 120 * step, output_tokens=18)
                if call is None:
                    return run.run_id, "success", steps
                tool, args = call
                run.tool_call(tool, args=args)
            return run.run_id, "gave up", steps
    except RunStopped as stopped:
        return stopped.run_id, f"stopped: {stopped.reason}", steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--agent", default="example-agent")
    parser.add_argument("--version", default="v1")
    parser.add_argument("--tickets", type=int, default=5)
    parser.add_argument("--loop-every", type=int, default=3, help="every Nth ticket loops (0: none)")
    parser.add_argument("--step-ms", type=float, default=200.0)
    args = parser.parse_args(argv)
    trackside = Trackside(args.bootstrap, args.agent, args.version)
    try:
        for ticket in range(1, args.tickets + 1):
            looping = bool(args.loop_every) and ticket % args.loop_every == 0
            try:
                run_id, ended, steps = handle(trackside, ticket, looping, args.step_ms / 1000)
            except VersionPaused as paused:
                print(f"ticket {ticket}: refused, {paused}", flush=True)
                continue
            print(f"ticket {ticket}: run {run_id} {ended} after {steps} steps", flush=True)
    finally:
        trackside.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
