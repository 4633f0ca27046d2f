"""The driver: calls every branch's Confirm or Cancel until its participant answers 2xx.

A pass (:meth:`Driver.run_once`, the scheduler's ``tcc`` job) cancels trying
transactions past their deadline, flags the stalled ones, then claims due confirming and
cancelling transactions under a lease and drives one *round* of each: every due branch
called at once, each result recorded the moment it comes (a branch stuck until its
timeout holds none of the others), then the transaction finished or released until its
earliest branch is due again. A failed call waits ``min(cap, base * 2**(n-1))`` ± jitter
before the next one, however many there were: Confirm and Cancel are never given up.

Only the URL declared for the participant in the configuration is ever called
(:meth:`ParticipantSettings.op_url`), never one from a row, with the proof of that one
call (:func:`reliable_msg.tcc.proof`).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp

from reliable_msg.errors import ReliableMsgError
from reliable_msg.metrics import (
    TCC_BRANCH_CALLS,
    TCC_OLDEST_UNFINISHED,
    TCC_STALLED,
    TCC_TRANSACTIONS,
)
from reliable_msg.policy import backoff
from reliable_msg.service.settings import Settings
from reliable_msg.service.tcc.ports import DrivingStore
from reliable_msg.service.tcc.rounds import Claimed, DueBranch
from reliable_msg.service.tcc.states import TxStatus
from reliable_msg.tcc import BRANCH_HEADER, GID_HEADER, OP_HEADER, call_body, proof, unproved

log = logging.getLogger(__name__)

#: Transactions one instance drives at once (the scheduler's and the kicked ones).
ROUNDS = 200
#: Connections one instance holds open to participants at once.
CONNECTIONS = 100
#: Bytes of a failed call's answer kept in its error.
ERROR_BODY = 200


class Driver:
    """Drives confirming and cancelling transactions to their end; see the module."""

    def __init__(
        self, settings: Settings, driving: DrivingStore, *, instance: str, rounds: int = ROUNDS
    ) -> None:
        self._settings = settings
        self._driving = driving
        #: the lease owner and the events' ``instance``
        self.instance = instance
        self._rounds = rounds
        self._busy = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._session: aiohttp.ClientSession | None = None
        self._stopping = False

    async def start(self) -> None:
        self._stopping = False
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=CONNECTIONS),
            headers={"Content-Type": "application/json"},
        )

    async def stop(self, grace: float = 10.0) -> None:
        """Start no round; let those under way end (up to ``grace`` seconds), then cancel
        them with their calls in flight, and wait for that: each cancelled round gives up
        its lease, so that another instance (or this one restarted) claims it at once."""
        self._stopping = True
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=grace)
        while pending := [t for t in self._tasks if not t.done()]:
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def run_once(self, *, wait: bool = True) -> int:
        """One pass: expire, flag the stalled, claim due transactions (as many as there
        are free rounds, at most ``scanner.batch``) and drive a round of each; return how
        many were claimed. With ``wait`` (the default) it returns when their rounds
        ended; the scheduler's job does not wait, so a slow round delays no pass."""
        cfg = self._settings
        await self._driving.expire(self.instance, cfg.scanner.batch)
        stalled = await self._driving.flag_stalled(
            cfg.tcc.stalled_after, self.instance, cfg.scanner.batch
        )
        for gid in stalled:
            log.warning(
                "tcc transaction %s stalled: not finished %g s after its commit or cancel;"
                " still retried",
                gid,
                cfg.tcc.stalled_after,
                extra={"gid": gid},
            )
        free = min(self._rounds - self._busy, cfg.scanner.batch)
        if self._stopping or free <= 0:
            return 0
        claimed = await self._driving.claim(self.instance, cfg.tcc.lease, free)
        started = [self._start(tx) for tx in claimed]
        if wait and started:
            await asyncio.wait(started)
        return len(claimed)

    def kick(self, gid: str) -> None:
        """Drive ``gid`` now, in the background (after a commit, a cancel or a retry):
        claimed like any other, so that no other instance drives it at the same time.
        Nothing happens when it is not due, leased, or every round is busy: a pass
        takes it later."""
        self.drive(gid)

    def drive(self, gid: str) -> asyncio.Task[None] | None:
        """:meth:`kick`, returning the task of its claim and round (None: not started)."""
        if self._stopping or self._session is None or self._busy >= self._rounds:
            return None
        task = asyncio.create_task(self._kick(gid), name=f"tcc kick of {gid}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _kick(self, gid: str) -> None:
        try:
            claimed = await self._driving.claim(self.instance, self._settings.tcc.lease, 1, gid)
        except ReliableMsgError as exc:
            log.warning(
                "tcc kick of %s failed (%s); a pass drives it", gid, exc, extra={"gid": gid}
            )
            return
        for tx in claimed:
            await self._start(tx)

    async def report(self) -> None:
        """Count transactions in the database for the gauges."""
        counts = await self._driving.counts()
        for status in TxStatus:
            TCC_TRANSACTIONS.labels(status.value).set(counts.statuses.get(status.value, 0))
        TCC_OLDEST_UNFINISHED.set(counts.oldest)
        TCC_STALLED.set(counts.stalled)

    def _start(self, tx: Claimed) -> asyncio.Task[None]:
        self._busy += 1
        task = asyncio.create_task(self._round(tx), name=f"tcc round of {tx.gid}")
        self._tasks.add(task)
        task.add_done_callback(self._ended)
        return task

    def _ended(self, task: asyncio.Task[None]) -> None:
        self._busy -= 1
        self._tasks.discard(task)

    async def _round(self, tx: Claimed) -> None:
        """Call the due branches at once, then close the round. A round that does not end
        (an error, or cancelled by :meth:`stop`) gives up its lease: its calls still in
        flight are cancelled (and recorded as nothing), and a pass takes it again at once
        rather than after ``tcc.lease``."""
        try:
            if tx.branches:
                async with asyncio.TaskGroup() as calls:
                    for b in tx.branches:
                        calls.create_task(self._branch(tx, b))
            finished = await self._driving.end_round(
                tx, self.instance, self.instance, called=bool(tx.branches)
            )
        except asyncio.CancelledError:
            await self._give_up(tx)
            raise
        except ReliableMsgError as exc:
            log.warning(
                "tcc round of %s failed (%s); driven again at the next pass",
                tx.gid,
                exc,
                extra={"gid": tx.gid},
            )
            await self._give_up(tx)
            return
        except Exception:
            log.exception(
                "tcc round of %s failed; driven again at the next pass",
                tx.gid,
                extra={"gid": tx.gid},
            )
            await self._give_up(tx)
            return
        if finished:
            log.info("tcc transaction %s %s", tx.gid, tx.move.dst.value, extra={"gid": tx.gid})

    async def _give_up(self, tx: Claimed) -> None:
        """Release the lease of a round that did not end, if still ours."""
        try:
            await self._driving.release(tx, self.instance)
        except Exception as exc:
            log.warning(
                "tcc round of %s: its lease could not be released (%s); driven again when it ends",
                tx.gid,
                exc,
                extra={"gid": tx.gid},
            )

    async def _branch(self, tx: Claimed, branch: DueBranch) -> None:
        """Call one branch and record the result at once; never raises (but
        cancellation), so that the round's other branches go on."""
        status, error = await self._call(tx, branch)
        op = tx.op.value
        try:
            if error is None:
                assert status is not None
                await self._driving.call_ok(tx, branch.branch, status, self.instance)
                TCC_BRANCH_CALLS.labels(op, "ok").inc()
                return
            TCC_BRANCH_CALLS.labels(op, "failed").inc()
            retry_in = self._backoff(branch.attempts + 1)
            await self._driving.call_failed(
                tx, branch.branch, status, error, retry_in, self.instance
            )
        except ReliableMsgError as exc:
            log.warning(
                "tcc %s of %s/%s: the result was not recorded (%s); called again",
                op,
                tx.gid,
                branch.branch,
                exc,
                extra={"gid": tx.gid, "branch": branch.branch},
            )
            return
        log.info(
            "tcc %s of %s/%s failed (%s); again in %.1f s",
            op,
            tx.gid,
            branch.branch,
            error,
            retry_in,
            extra={"gid": tx.gid, "branch": branch.branch},
        )

    def _backoff(self, attempt: int) -> float:
        cfg = self._settings.tcc
        return backoff(
            attempt, base=cfg.backoff_base, factor=2.0, cap=cfg.backoff_cap, jitter=cfg.jitter
        )

    async def _call(self, tx: Claimed, branch: DueBranch) -> tuple[int | None, str | None]:
        """POST the branch's Confirm or Cancel to its declared participant: the HTTP
        status (None when there was no answer) and an error (None for a 2xx)."""
        participant = self._settings.participants.get(branch.participant)
        if participant is None:
            return None, f"participant {branch.participant!r} is not declared"
        if self._session is None:
            raise RuntimeError("Driver.start() was not awaited")
        op = tx.op
        token = participant.token.get_secret_value()
        bearer = proof(token, tx.gid, branch.branch, op)
        headers = {
            GID_HEADER: tx.gid,
            BRANCH_HEADER: branch.branch,
            OP_HEADER: op.value,
            "Authorization": f"Bearer {bearer}",
            "Content-Type": "application/json",
        }
        timeout = self._settings.call_timeout(branch.participant)
        try:
            async with self._session.post(
                participant.op_url(op),
                data=call_body(tx.gid, branch.branch, op, branch.payload),
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=timeout),
                allow_redirects=False,
            ) as response:
                status = response.status
                answer = await response.content.read(ERROR_BODY)
        except TimeoutError:
            return None, f"timeout after {timeout:g} s"
        except aiohttp.ClientConnectorError as exc:
            refused = isinstance(exc.os_error, ConnectionRefusedError)
            return None, "connection refused" if refused else f"cannot connect: {exc.os_error}"
        except (aiohttp.ClientError, OSError) as exc:
            # str, not repr: a ClientResponseError's repr holds the request's headers
            return None, unproved(f"call failed: {type(exc).__name__}: {exc}", bearer)
        if 200 <= status < 300:
            return status, None
        return status, unproved(f"HTTP {status}: {answer.decode(errors='replace')}", bearer)
