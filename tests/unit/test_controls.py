"""Controls (SPEC §9): the constructor checks what a control needs, keys it by its subject, and
gives a control issued again for the same episode the same id."""

import orjson
import pytest

from streams.contracts.controls import InvalidControl, make_control, parse_control, subject_of


def test_a_control_is_keyed_by_its_subject_and_an_episode_gives_it_one_id():
    stop = make_control(action="stop_run", run_id="r-1", reason="looping", issued_by="trackside", ts=1,
                        alert_id="a-1", episode="a-1")
    again = make_control(action="stop_run", run_id="r-1", reason="looping", issued_by="trackside", ts=2, episode="a-1")
    assert stop["control_id"] == again["control_id"] and subject_of(stop) == "r-1"
    pause = make_control(action="pause_version", agent_id="bot", agent_version="v2", reason="bad canary",
                         issued_by="ana", ts=3)
    manual = make_control(action="pause_version", agent_id="bot", agent_version="v2", reason="again",
                          issued_by="ana", ts=4)
    assert subject_of(pause) == "bot/v2" and pause["control_id"] != manual["control_id"]  # a person's: each new
    assert parse_control(orjson.dumps(pause)) == pause


@pytest.mark.parametrize(("fields", "why"), [
    ({"action": "stop_run"}, "needs a run_id"),
    ({"action": "pause_version", "agent_id": "bot"}, "needs an agent_id and an agent_version"),
    ({"action": "reboot", "run_id": "r"}, "action must be one of"),
    ({"action": "stop_run", "run_id": "r", "reason": "  "}, "needs a reason"),
    ({"action": "stop_run", "run_id": "r", "issued_by": ""}, "needs issued_by"),
])
def test_a_control_without_what_it_needs_is_refused(fields, why):
    with pytest.raises(InvalidControl, match=why):
        make_control(**{"reason": "x", "issued_by": "ana", "ts": 1, **fields})


@pytest.mark.parametrize("value", [b"not json", b"[]", b'{"action": "stop_run"}',
                                   orjson.dumps({"control_id": "c", "ts": "yesterday", "action": "stop_run",
                                                 "run_id": "r", "reason": "x", "issued_by": "a"})])
def test_what_is_not_a_control_is_refused_when_read(value):
    with pytest.raises(InvalidControl):
        parse_control(value)
