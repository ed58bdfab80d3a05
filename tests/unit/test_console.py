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
