"""The front door tells the stack's own Kafka clients from agents by the first request header."""

from __future__ import annotations

import struct

from streams.ops.frontdoor import STACK_CLIENT_ID, client_id


def _request(name: str | None, body: bytes = b"\x00" * 8) -> bytes:
    # api_key 18 (ApiVersions), version 3, correlation id 1, then the client id as Kafka writes it
    encoded = b"\xff\xff" if name is None else struct.pack(">h", len(name.encode())) + name.encode()
    header = struct.pack(">hhi", 18, 3, 1) + encoded
    return struct.pack(">i", len(header) + len(body)) + header + body


def test_the_client_id_is_read_once_its_header_is_whole():
    whole = _request(f"{STACK_CLIENT_ID}-sink")
    cut = 14 + len(f"{STACK_CLIENT_ID}-sink")
    assert [client_id(whole[:n]) for n in (0, 13, 14, cut - 1)] == [None] * 4
    assert client_id(whole[:cut]) == client_id(whole) == f"{STACK_CLIENT_ID}-sink"


def test_a_null_or_odd_client_id_is_an_agents():
    assert client_id(_request(None)) == ""
    assert client_id(_request("rdkafka")) == "rdkafka"
    assert not client_id(_request("trackside")).startswith(STACK_CLIENT_ID)
