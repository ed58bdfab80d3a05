"""Failure modes' quality bar on simulated fleets: the modes match the injected failure families."""

from __future__ import annotations

from sklearn.metrics import adjusted_rand_score

from jobs.evaluate_failures import assemble_runs, scored
from jobs.evaluate_modes import LOOP, evaluate, mode_fleet
from jobs.simulate import FleetConfig, run_labels, simulate
from streams.detect.failures import FailureClusterer


def test_adjusted_rand_index_on_simulated_fleet():
    cfg = FleetConfig(seed=7, runs=1500)
    runs = assemble_runs(simulate(cfg))
    _, _, assigned = FailureClusterer().update(runs)
    pairs = scored(runs, run_labels(cfg))
    assert len(pairs) > 250
    ari = adjusted_rand_score(["/".join(f) for _, f in pairs], [assigned[r] for r, _ in pairs])
    assert ari >= 0.9


def test_families_that_span_agents_are_one_mode_each():
    """Seed 5 of the quality job (jobs.evaluate_modes): families over several agents, unrelated last
    tools, near-miss ValidationErrors and ToolErrors, free text, a family starting mid-stream, loops."""
    fleet = mode_fleet(5, 3000)
    assert any(len(agents) >= 3 for agents in fleet.spread.values())
    result = evaluate(5, 3000)
    assert result["failed_runs"] > 800 and result["families"] == 11
    assert result["ari"] >= 0.9 and result["homogeneity"] >= 0.9 and result["completeness"] >= 0.9
    assert result["loops"] > 100 and result["loops_outside"] == 0 and result["others_in_loop_mode"] == 0
    # the family that appears mid-stream: one incident, sent again as it spread to its second agent
    assert result["incidents"] == {"payments_down": 1}
    assert result["spread"]["payments_down"][-1] == sorted(result["family_agents"]["payments_down"])
    assert len(result["spread"]["payments_down"]) == 2
    assert 0 <= result["minutes_to_alert"]["payments_down"] <= 30
    # every family's mode gets one id whichever of its runs came first (spellings, names, free text)
    assert result["order_free_ids"] == 11 and result["order_bound"] == []


def test_the_old_per_agent_signature_would_miss_the_bar():
    """What the issue measured: a mode per agent and last tool splits every family."""
    fleet = mode_fleet(5, 3000)
    failed = [r for r in fleet.runs if r["outcome"] != "success"]
    split = {r["run_id"]: f"{fleet.labels[r['run_id']]}/{r['agent_id']}/{r['tool_path'][-1]}" for r in failed}
    truth = [fleet.labels[r["run_id"]] for r in failed]
    assert adjusted_rand_score(truth, [split[r["run_id"]] for r in failed]) < 0.5
    assert LOOP in truth
