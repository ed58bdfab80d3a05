"""The embedded broker's public port: a relay to its private port that the stack closes to agents
while it recycles the broker. Why and how: streams/ops/README.md, "The front door"."""

from __future__ import annotations

import asyncio
import logging
import threading

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


class FrontDoor:
    """Listens on `public_port`, relays every connection to `private_port` byte for byte."""

    def __init__(self, public_port: int, private_port: int, host: str = "127.0.0.1") -> None:
        self.host, self.public_port, self.private_port = host, public_port, private_port
        self.agents_shut_out = False
        self._agents: set[_Client] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="front-door", daemon=True)
        self._server: asyncio.AbstractServer | None = None

    def start(self) -> None:
        self._thread.start()
        self._server = self._call(self._loop.create_server(
            lambda: _Client(self), self.host, self.public_port, reuse_address=True))

    def shut_out_agents(self) -> None:
        """Drop every agent's connection and refuse new ones: nothing more reaches the broker
        from outside the stack. Their clients keep what they could not send and retry."""
        async def shut() -> int:
            self.agents_shut_out = True
            dropped = list(self._agents)
            for client in dropped:
                client.drop()
            return len(dropped)
        log.info("front door closed to agents (%d connection(s) dropped)", self._call(shut()))

    def let_agents_in(self) -> None:
        async def reopen() -> None:
            self.agents_shut_out = False
        self._call(reopen())
        log.info("front door open to agents")

    def stop(self) -> None:
        if self._server is not None:
            async def close() -> None:
                self._server.close()
                for client in list(_Client.open_ones):
                    client.drop()
            self._call(close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def _call(self, coroutine):  # noqa: ANN001, ANN202
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(10)


class _Client(asyncio.Protocol):
    """One client's connection: held until its first request header names the client, then
    relayed to a connection of its own to the broker; reading pauses while the other side's
    writes back up."""

    open_ones: set[_Client] = set()

    def __init__(self, door: FrontDoor) -> None:
        self.door = door
        self.transport: asyncio.Transport | None = None
        self.upstream: asyncio.Transport | None = None
        self.pending: bytearray | None = bytearray()  # until the broker side is connected
        self.agent: bool | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        _Client.open_ones.add(self)

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
            self.door._agents.add(self)
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
        _Client.open_ones.discard(self)
        self.door._agents.discard(self)
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
