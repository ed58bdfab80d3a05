"""The run assembler's state is bounded by the idle timeout, whatever the runs do (issue 6.4).
Figures for 100k runs: `python -m jobs.bench_state`."""

from jobs.bench_state import concurrent_runs, endless


def test_concurrent_open_runs_are_closed_then_forgotten_and_the_memory_goes_back():
    result = concurrent_runs(20_000)
    assert result["open_runs"] == 20_000
    assert result["timed_out_rows"] == 20_000
    assert result["open_closed_after_timeout"] == (1, 20_000), "closed runs are kept one idle timeout"
    assert result["open_closed_after_forget"] == (1, 1), "then forgotten"
    assert result["after_mb"] < 0.15 * result["held_mb"]


def test_runs_that_never_end_do_not_grow_the_state():
    result = endless(hours=3, runs_per_min=50)
    # 50 runs a minute, a 30-minute idle timeout: at most ~30 min of runs open, ~60 min kept closed
    assert result["max_open"] <= 50 * 32
    assert result["max_closed_kept"] <= 50 * 62
    assert result["peak_second_half_mb"] <= 1.1 * result["peak_first_half_mb"]
