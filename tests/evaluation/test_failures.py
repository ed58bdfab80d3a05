"""Failure clustering's quality bar on one simulated fleet: the clusters match the injected failure modes."""

from __future__ import annotations

from sklearn.metrics import adjusted_rand_score

from jobs.evaluate_failures import assemble_runs, scored
from jobs.simulate import FleetConfig, run_labels, simulate
from streams.detect.failures import FailureClusterer


def test_adjusted_rand_index_on_simulated_fleet():
    cfg = FleetConfig(seed=7, runs=1500)
    runs = assemble_runs(simulate(cfg))
    _, _, assigned = FailureClusterer().update(runs)
    pairs = scored(runs, run_labels(cfg))
    assert len(pairs) > 250
    ari = adjusted_rand_score(["/".join(f) for _, f in pairs], [assigned[r] for r, _ in pairs])
    assert ari >= 0.8
