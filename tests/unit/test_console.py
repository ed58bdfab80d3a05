"""The console's rules that need no service: the token beyond 127.0.0.1."""

import pytest
from pydantic import SecretStr

from streams.console.app import Console, is_loopback
from streams.errors import ConfigError
from streams.settings import Settings


def test_listening_beyond_loopback_needs_a_token():
    def read(sql, parameters):
        return []

    with pytest.raises(ConfigError, match="TRACKSIDE_CONSOLE_TOKEN"):
        Console(Settings(console_host="0.0.0.0"), read, None)
    console = Console(Settings(console_host="0.0.0.0", console_token=SecretStr("t")), read, None)
    assert console.open_reads is False  # every request needs the token
    assert Console(Settings(), read, None).open_reads is True
    assert [is_loopback(host) for host in ("127.0.0.1", "::1", "localhost", "0.0.0.0", "10.1.2.3")] == [
        True, True, True, False, False]


def test_the_live_view_fed_by_the_sink_opens_closes_and_flags_runs():
    from streams.console.live import LiveRuns
    from streams.contracts.messages import EVENT_FIELDS, pack

    def packed(n: int, kind: str, run_id: str = "r1", **fields) -> tuple:
        event = dict.fromkeys(EVENT_FIELDS, "")
        event.update({"event_id": f"{run_id}-{n}", "ts": 1_000 + n, "type": kind, "run_id": run_id, "agent_id": "a",
                      "agent_version": "v1", "cost_usd": None, **fields})
        return pack(event)

    live = LiveRuns({}, idle_timeout_ms=60_000, fed=True)
    live.start()
    assert live.listening.is_set()  # no consumer to join: it is told
    version = live.version
    live.events([packed(0, "run_start"), packed(1, "tool_call", tool="search", cost_usd=0.25),
                 packed(1, "tool_call", tool="search", cost_usd=0.25)])  # the same event twice counts once
    assert live.version > version
    (run,) = live.snapshot()
    assert (run["run_id"], run["steps"], run["last_tool"], run["cost_usd"]) == ("r1", 1, "search", 0.25)
    live.alerted([{"alert_id": "x", "kind": "loop", "status": "firing", "run_id": "r1"}])
    assert live.get("r1")["loop_suspected"] is True and live.recent_alerts(0)[1] == 1
    live.runs_closed(["r1"])
    assert live.snapshot() == []
    live.stop()
