"""The environment faults of :mod:`soak.plan`, injected for real: processes killed with
SIGKILL, RabbitMQ's connections closed and its application stopped, PostgreSQL's
backends terminated and its server restarted, the network to RabbitMQ stalled and cut,
the TCC participants killed, and the network to one of them stalled and cut.

:meth:`Injector.restore` undoes whatever a fault interrupted halfway (RabbitMQ stopped,
PostgreSQL down, the proxy stalled); the runner calls it whatever happens.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Sequence
from pathlib import Path

import asyncpg

from demo import rabbit
from demo.errors import DemoError
from demo.processes import Child, run_logged
from reliable_msg.harness import servers
from reliable_msg.harness.proxy import FaultProxy

from .plan import Fault, Kind

#: Seconds to wait for a free connection slot to terminate the others from.
ADMIN_PATIENCE = 30.0
#: Seconds PostgreSQL gets to take connections again after a restart.
PG_COMEBACK = 60.0


class Injector:
    def __init__(
        self,
        *,
        instances: Sequence[Child],
        proxy: FaultProxy,
        participants: Sequence[Child] = (),
        participant_proxies: Sequence[FaultProxy] = (),
        outage: rabbit.Outage,
        admin_dsn: str,
        databases: Sequence[str],
        log: Path,
    ) -> None:
        self._instances = instances
        self._proxy = proxy
        self._participants = participants
        self._participant_proxies = participant_proxies
        self._outage = outage
        self._admin_dsn = admin_dsn
        self._databases = list(databases)
        self._log = log
        self._pg_down = False

    async def inject(self, fault: Fault) -> str:
        """Inject ``fault`` and wait until it is over (a stall resumed, a server back);
        what happened, in words."""
        match fault.kind:
            case Kind.KILL_INSTANCE | Kind.KILL_PARTICIPANT:
                return self._kill(self.victim(fault))
            case Kind.CLOSE_CONNECTIONS:
                await self._ctl(
                    servers.rabbitmqctl("close_all_connections", "soak: injected fault")
                )
                return "RabbitMQ closed every AMQP connection"
            case Kind.BROKER_RESTART:
                await self._outage.stop()
                await asyncio.sleep(fault.hold)
                await self._outage.restore()
                return f"RabbitMQ's application stopped for {fault.hold:.1f} s, started again"
            case Kind.PG_TERMINATE:
                return f"{await self._terminate()} PostgreSQL backends terminated"
            case Kind.PG_RESTART:
                seconds = await self._restart_postgres()
                return f"PostgreSQL server restarted, answering again after {seconds:.1f} s"
            case Kind.PROXY_STALL:
                await _stall(self._proxy, fault.hold)
                return f"the network to RabbitMQ stalled for {fault.hold:.1f} s"
            case Kind.PROXY_CUT:
                await self._proxy.cut()
                return "the network to RabbitMQ reset every connection"
            case Kind.PARTICIPANT_STALL:
                await _stall(self._participant_proxy(fault), fault.hold)
                return f"the network to participant{fault.where} stalled for {fault.hold:.1f} s"
            case Kind.PARTICIPANT_CUT:
                await self._participant_proxy(fault).cut()
                return f"the network to participant{fault.where} reset every connection"

    def victim(self, fault: Fault) -> Child:
        """The process a kill hits."""
        if fault.kind is Kind.KILL_PARTICIPANT:
            return self._participants[fault.target % len(self._participants)]
        return self._instances[fault.target % len(self._instances)]

    def _participant_proxy(self, fault: Fault) -> FaultProxy:
        return self._participant_proxies[fault.target % len(self._participant_proxies)]

    async def restore(self) -> None:
        """Undo a fault interrupted halfway; wait until every dependency answers."""
        for proxy in (self._proxy, *self._participant_proxies):
            proxy.resume()
        if self._outage.down:
            await self._outage.restore()
        if self._pg_down or not await self._pg_answers():
            await self._pg_ctl("start")
            await self._pg_back()

    def _kill(self, child: Child) -> str:
        proc = child.proc
        if proc is None or proc.poll() is not None:
            return f"{child.name} was not running (already being restarted)"
        os.kill(proc.pid, signal.SIGKILL)
        return f"{child.name} (pid {proc.pid}) killed with SIGKILL"

    async def _terminate(self) -> int:
        conn = await self._admin_connection()
        try:
            count: int = await conn.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = ANY($1::text[]) AND pid <> pg_backend_pid()",
                self._databases,
            )
        finally:
            await conn.close()
        return count

    async def _admin_connection(self) -> asyncpg.Connection:
        """A connection to terminate the others with; while the server is full (other
        work on a shared server), try again for a while."""
        deadline = time.monotonic() + ADMIN_PATIENCE
        while True:
            try:
                return await asyncpg.connect(self._admin_dsn)
            except asyncpg.TooManyConnectionsError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)

    async def _restart_postgres(self) -> float:
        started = time.monotonic()
        self._pg_down = True
        await self._pg_ctl("restart")
        await self._pg_back()
        return time.monotonic() - started

    async def _pg_back(self) -> None:
        if not await servers.wait_until(self._pg_answers, within=PG_COMEBACK, every=0.2):
            raise DemoError(f"PostgreSQL does not answer {PG_COMEBACK:.0f} s after a restart")
        self._pg_down = False

    async def _pg_answers(self) -> bool:
        return await servers.postgres_answers(self._admin_dsn)

    async def _pg_ctl(self, action: str) -> None:
        version = servers.pg_version()
        if version is None:
            raise DemoError(f"cannot {action} PostgreSQL: no cluster under {servers.PG_CLUSTERS}")
        await self._ctl(servers.pg_ctlcluster(version, action))

    async def _ctl(self, argv: list[str]) -> None:
        await run_logged(argv, self._log)


async def _stall(proxy: FaultProxy, hold: float) -> None:
    proxy.stall()
    try:
        await asyncio.sleep(hold)
    finally:
        proxy.resume()
