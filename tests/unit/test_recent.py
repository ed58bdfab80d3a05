from streams.detect.recent import RecentRuns


def test_recent_runs_remember_at_least_size_and_at_most_twice_that():
    recent = RecentRuns(3)
    for n in range(7):
        recent[f"r{n}"] = f"c{n}" if n % 2 else ""
    # r6 opened a third generation: r0..r2 are gone, r3..r6 remembered with their values ("" too)
    assert len(recent) == 4 and "r2" not in recent and recent.get("r2", "?") == "?"
    assert [recent.get(f"r{n}") for n in range(3, 7)] == ["c3", "", "c5", ""]
    recent["r3"] = "again"  # known in the old generation: the new value wins
    assert recent.get("r3") == "again"
