"""The pipeline watch: lag as the age of what a stage has not processed, and its `pipeline` alert."""

from streams.ops.watch import PipelineWatch

T = 1_800_000_000_000


def test_lag_is_the_age_of_the_oldest_unprocessed_message_per_partition():
    watch = PipelineWatch(bound_s=10)
    assert watch.lag_ms("assemble_runs", T) == 0 and watch.last_message_age_ms("assemble_runs", T) is None
    for ts in (T, T + 100, T + 200):
        watch.handed("assemble_runs", 0, ts)
    watch.handed("assemble_runs", 1, T + 50)
    assert watch.lag_ms("assemble_runs", T + 1000) == 1000
    watch.processed("assemble_runs", 0, T + 100)
    # partition 1 is not done: partition 0 being further does not hide it
    assert watch.lag_ms("assemble_runs", T + 1000) == 950
    watch.processed("assemble_runs", 1, T + 50)
    assert watch.lag_ms("assemble_runs", T + 1000) == 800
    watch.processed("assemble_runs", 0, T + 200)
    assert watch.lag_ms("assemble_runs", T + 5000) == 0
    assert watch.last_message_age_ms("assemble_runs", T + 5000) == 4800
    assert watch.lag_ms("compute_metrics", T + 5000) == 0


def test_a_stopped_stage_fires_once_and_resolves_when_it_catches_up():
    watch = PipelineWatch(bound_s=10)
    watch.handed("compute_metrics", 3, T)
    assert watch.check(T + 10_000) == []  # at the bound, not beyond
    (firing,) = watch.check(T + 10_001)
    assert (firing["kind"], firing["status"], firing["agent_id"]) == ("pipeline", "firing", "")
    assert firing["evidence"]["stage"] == "compute_metrics" and firing["evidence"]["lag_seconds"] == 10.001
    assert watch.check(T + 60_000) == []  # while it fires it is not sent again
    watch.processed("compute_metrics", 3, T)
    (resolved,) = watch.check(T + 61_000)
    assert resolved["status"] == "resolved" and resolved["fingerprint"] == firing["fingerprint"]
    assert resolved["alert_id"] != firing["alert_id"]
    assert watch.check(T + 62_000) == []


def test_the_broker_memory_alert_fires_once_and_resolves_below_its_bound():
    watch = PipelineWatch(60)
    assert watch.check_broker(900, 1_000, 1) == []
    (firing,) = watch.check_broker(1_200, 1_000, 2)
    assert (firing["kind"], firing["status"], firing["evidence"]["resident_bytes"]) == ("pipeline", "firing", 1_200)
    assert watch.check_broker(1_500, 1_000, 3) == []  # still firing: not sent again
    (resolved,) = watch.check_broker(800, 1_000, 4)
    assert resolved["status"] == "resolved" and resolved["fingerprint"] == firing["fingerprint"]
    assert watch.check_broker(10**12, 0, 5) == []  # 0: off
