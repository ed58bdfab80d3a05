"""The simulator's speed on a fleet-sized run: it must outpace the pipeline it feeds in the bench
(README: at best ~36k events/s end to end), with room for a busy machine."""

import itertools
import time

from jobs.simulate import FleetConfig, simulate


def test_speed_of_200k_events():
    began = time.process_time()  # CPU time: other processes on the machine do not count
    n = sum(1 for _ in itertools.islice(simulate(FleetConfig(runs=17_000, seed=1)), 200_000))
    took = time.process_time() - began
    print(f"\n{n} events in {took:.2f} s of CPU ({n / took:,.0f} events/s)")
    assert n == 200_000, "17,000 runs make more than 200k events"
    assert n / took > 20_000, f"the simulator made {n / took:,.0f} events/s"
