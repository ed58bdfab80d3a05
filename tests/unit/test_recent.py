from streams.detect.recent import RunMemory


def test_runs_are_sealed_into_arrays_and_expire_there():
    tombstones = RunMemory(slack=60_000)
    tombstones.SEAL_EVERY = 3
    for n, forget in enumerate((50, 100, 200, 300)):
        tombstones.put(f"r{n}", forget)
    assert len(tombstones._hashes) == 3 and len(tombstones._new) == 1  # three sealed, one new
    assert all(f"r{n}" in tombstones for n in range(4)) and "r9" not in tombstones
    tombstones.put("r0", 100_000)  # closed again after it was forgotten: the later forget counts
    tombstones.expire(150)
    assert "r0" in tombstones and "r1" not in tombstones and "r2" in tombstones
    tombstones.expire(60_000 + 50)  # a minute past the oldest: sealed again without those due
    assert len(tombstones) == 1 and "r0" in tombstones and "r3" not in tombstones
    few = RunMemory(slack=60_000)  # never SEAL_EVERY of them: they expire all the same
    few.put("a", 100)
    few.put("b", 200)
    few.expire(60_000 + 200)
    assert len(few) == 0


def test_a_count_bound_keeps_the_last_runs_with_their_values_and_the_newest_value_wins():
    recent: RunMemory[str] = RunMemory(slack=3)
    recent.SEAL_EVERY = 2
    for n in range(7):
        recent.put(f"r{n}", n + 4, f"c{n}" if n % 2 else "")  # the last three runs put
        recent.expire(n + 1)
    assert "r3" not in recent and recent.get("r3", "?") == "?"
    assert [recent.get(f"r{n}") for n in range(4, 7)] == ["", "c5", ""]
    assert len(recent) <= 6  # at most the bound and its slack, and the dict not sealed yet
    recent.put("r5", 10, "again")  # known sealed: the new value wins, sealed or not
    assert recent.get("r5") == "again"
    recent.put("r6", 11, "x")
    recent.put("r7", 12, "y")  # seals: r5's newer entry kept over the older one
    assert recent.get("r5") == "again" and len(recent._hashes) == len(set(recent._hashes.tolist()))


def test_a_run_set_counts_each_run_once_across_its_seals():
    from streams.detect.recent import RunSet

    class Small(RunSet):
        SEAL_EVERY = 4

    runs = Small()
    for n in [*range(10), *range(10), 3, 11]:  # sealed twice while adding, then again at the end
        runs.add(f"r{n}")
    assert len(runs) == 11 and len(runs._new) < 4
    runs.seal()
    runs.add("r0")
    runs.add("r5")
    assert len(runs) == 11 and len(runs._sealed) == 11
