"""The embedded broker's public port: a relay to its private port, in a process of its own, that the
stack closes to agents while it recycles the broker. Why and how: streams/ops/README.md, "The front door"."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
from pathlib import Path

from streams.errors import BrokerError
from streams.runtime import die_with_parent

log = logging.getLogger(__name__)

# The client.id of every Kafka client of the stack itself starts with this; any other client
# is an agent's (or a person's) and is shut out while the door is closed.
STACK_CLIENT_ID = "trackside-stack"
# A connection that has not sent a whole request header within this many bytes is not Kafka.
_HEADER_MAX_BYTES = 64 << 10


def client_id(head: bytes | bytearray) -> str | None:
    """The client.id of the first Kafka request in `head`, or None until its header is whole.

    A request is size (int32), api_key (int16), api_version (int16), correlation_id (int32),
    client_id (int16 length, -1 for null, then UTF-8) in every header version that has one.
    """
    if len(head) < 14:
        return None
    length = int.from_bytes(head[12:14], "big", signed=True)
    if length < 0:
        return ""
    if len(head) < 14 + length:
        return None
    return bytes(head[14:14 + length]).decode("utf-8", "replace")


class Relay:
    """Listens on `public_port`, relays every connection to `private_port` byte for byte; runs
    on the event loop of the front door's own process."""

    def __init__(self, public_port: int, private_port: int, host: str = "127.0.0.1") -> None:
        self.host, self.public_port, self.private_port = host, public_port, private_port
        self.agents_shut_out = False
        self.agents: set[_Client] = set()  # the connections of agents, which a shut-out drops

    async def serve(self) -> asyncio.AbstractServer:
        return await asyncio.get_running_loop().create_server(
            lambda: _Client(self), self.host, self.public_port, reuse_address=True)

    def shut_out_agents(self) -> int:
        """Drop every agent's connection and refuse new ones; returns how many were dropped."""
        self.agents_shut_out = True
        dropped = list(self.agents)
        for client in dropped:
            client.drop()
        return len(dropped)

    def let_agents_in(self) -> None:
        self.agents_shut_out = False


class FrontDoor:
    """The relay in a process of its own (`python -m streams.ops.frontdoor PUBLIC PRIVATE`), so
    that it never waits for the GIL of `up`, whose sink is busy; commands on its stdin."""

    def __init__(self, public_port: int, private_port: int, log_file: Path) -> None:
        self.public_port, self.private_port, self.log_file = public_port, private_port, log_file
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") as errors:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "streams.ops.frontdoor", str(self.public_port), str(self.private_port)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors, start_new_session=True,
                preexec_fn=die_with_parent)
        self._answer("listening")

    def shut_out_agents(self) -> None:
        """Drop every agent's connection and refuse new ones: nothing more reaches the broker
        from outside the stack. Their clients keep what they could not send and retry."""
        self._send("shut")
        log.info("front door closed to agents (%s connection(s) dropped)", self._answer("shut").split()[-1])

    def let_agents_in(self) -> None:
        self._send("open")
        self._answer("open")
        log.info("front door open to agents")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.stdin.close()  # end of commands: it leaves
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def _send(self, command: str) -> None:
        self.process.stdin.write(f"{command}\n".encode())
        self.process.stdin.flush()

    def _answer(self, expected: str) -> str:
        line = self.process.stdout.readline().decode().strip()
        if not line.startswith(expected):
            raise BrokerError(f"the front door said {line!r}, not {expected!r}; see {self.log_file}")
        return line


async def _serve(public_port: int, private_port: int) -> None:
    relay = Relay(public_port, private_port)
    await relay.serve()
    loop = asyncio.get_running_loop()
    commands = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(commands), sys.stdin)
    sys.stdout.write("listening\n")
    sys.stdout.flush()
    while command := (await commands.readline()).decode().strip():
        if command == "shut":
            sys.stdout.write(f"shut {relay.shut_out_agents()}\n")
        elif command == "open":
            relay.let_agents_in()
            sys.stdout.write("open\n")
        sys.stdout.flush()


def main() -> None:
    public_port, private_port = map(int, sys.argv[1:3])
    asyncio.run(_serve(public_port, private_port))


class _Client(asyncio.Protocol):
    """One client's connection: held until its first request header names the client, then
    relayed to a connection of its own to the broker; reading pauses while the other side's
    writes back up."""

    def __init__(self, door: Relay) -> None:
        self.door = door
        self.transport: asyncio.Transport | None = None
        self.upstream: asyncio.Transport | None = None
        self.pending: bytearray | None = bytearray()  # until the broker side is connected
        self.agent: bool | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.pending is None:
            self.upstream.write(data)
            return
        self.pending += data
        if self.agent is not None:
            return  # connecting
        who = client_id(self.pending)
        if who is None:
            if len(self.pending) > _HEADER_MAX_BYTES:
                self.drop()
            return
        self.agent = not who.startswith(STACK_CLIENT_ID)
        if self.agent:
            if self.door.agents_shut_out:
                self.drop()
                return
            self.door.agents.add(self)
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        try:
            upstream, _ = await asyncio.get_running_loop().create_connection(
                lambda: _Broker(self), self.door.host, self.door.private_port)
        except OSError as error:
            log.debug("front door: broker not reachable (%s)", error)
            self.drop()
            return
        if self.transport.is_closing():
            upstream.close()
            return
        self.upstream = upstream
        upstream.write(bytes(self.pending))
        self.pending = None

    def drop(self) -> None:
        self.transport.abort()  # connection_lost follows and closes the broker side

    def connection_lost(self, exc: Exception | None) -> None:
        self.door.agents.discard(self)
        if self.upstream is not None:
            self.upstream.close()

    # The client reads slower than the broker sends: stop reading the broker for a while.
    def pause_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None and not self.upstream.is_closing():
            self.upstream.resume_reading()


class _Broker(asyncio.Protocol):
    """The broker side of one client's connection."""

    def __init__(self, client: _Client) -> None:
        self.client = client

    def data_received(self, data: bytes) -> None:
        if not self.client.transport.is_closing():
            self.client.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.transport.close()

    def pause_writing(self) -> None:
        self.client.transport.pause_reading()

    def resume_writing(self) -> None:
        if not self.client.transport.is_closing():
            self.client.transport.resume_reading()


if __name__ == "__main__":
    main()
