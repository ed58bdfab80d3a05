"""The simulator's speed on a fleet-sized run."""

import itertools
import time

from jobs.simulate import FleetConfig, simulate


def test_speed_of_200k_events():
    began = time.perf_counter()
    n = sum(1 for _ in itertools.islice(simulate(FleetConfig(runs=17_000, seed=1)), 200_000))
    took = time.perf_counter() - began
    print(f"\n{n} events in {took:.2f}s ({n / took:,.0f} events/s)")
