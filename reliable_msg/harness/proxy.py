"""A TCP proxy that injects network faults between a client and a server.

It forwards bytes both ways until told otherwise:

- :meth:`FaultProxy.stall` stops forwarding (connections stay open, bytes wait, new
  connections are accepted and wait too) until :meth:`FaultProxy.resume`: a peer that
  hangs;
- :meth:`FaultProxy.cut` aborts every open connection (a reset on both sides): a
  network that drops;
- :meth:`FaultProxy.down` cuts and stops listening, so new connections are refused,
  until :meth:`FaultProxy.up` listens again on the same port: a server that is gone.

Given several targets, it spreads connections over them in turn and skips a target
that refuses: a load balancer in front of several instances.

It runs in the caller's event loop; the tests and the soak run drive it directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Sequence

from reliable_msg.aio import first_of

#: Bytes read from one side before they are written to the other.
CHUNK = 64 * 1024


class FaultProxy:
    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        port: int = 0,
        more_targets: Sequence[tuple[str, int]] = (),
    ) -> None:
        self.targets = [(target_host, target_port), *more_targets]
        self._next = 0
        self.port = port
        self._server: asyncio.Server | None = None
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        #: Connections accepted since the start, for the curious.
        self.accepted = 0

    @property
    def stalled(self) -> bool:
        return not self._flowing.is_set()

    @property
    def listening(self) -> bool:
        return self._server is not None

    async def start(self) -> FaultProxy:
        await self.up()
        return self

    async def up(self) -> None:
        """Listen (again) on :attr:`port`; the first call picks a free port when 0."""
        if self._server is not None:
            return
        self._server = await asyncio.start_server(
            self._accept, "127.0.0.1", self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def down(self) -> None:
        """Stop listening and cut every connection: the server is gone."""
        if self._server is not None:
            self._server.close()
            self._server = None
        await self.cut()

    def stall(self) -> None:
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    async def cut(self) -> None:
        """Abort every open connection, both sides."""
        for writer in list(self._writers):
            _abort(writer)
        self._writers.clear()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def close(self) -> None:
        self.resume()
        await self.down()

    async def __aenter__(self) -> FaultProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def url(self, scheme: str, userinfo: str = "", path: str = "") -> str:
        """``scheme://userinfo@127.0.0.1:port/path``, the address to give the client."""
        at = f"{userinfo}@" if userinfo else ""
        return f"{scheme}://{at}127.0.0.1:{self.port}{path}"

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # The connection is served by a task of our own, which cut() may cancel.
        self.accepted += 1
        self._writers.add(writer)
        task = asyncio.create_task(self._serve(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._flowing.wait()
            upstream = await self._connect()
            if upstream is None:
                return
            up_reader, up_writer = upstream
            self._writers.add(up_writer)
            try:
                # Either side closing ends both: neither AMQP nor PostgreSQL half-closes.
                await first_of(self._pump(reader, up_writer), self._pump(up_reader, writer))
            finally:
                _abort(up_writer)
                self._writers.discard(up_writer)
        finally:
            _abort(writer)
            self._writers.discard(writer)

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        """A connection to the next target that takes one; None if none does."""
        for _ in self.targets:
            target = self.targets[self._next % len(self.targets)]
            self._next += 1
            try:
                return await asyncio.open_connection(*target)
            except OSError:
                continue
        return None

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(CHUNK):
                await self._flowing.wait()
                writer.write(data)
                await writer.drain()


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with a reset rather than a FIN: a connection that is cut, not closed."""
    transport = writer.transport
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()
