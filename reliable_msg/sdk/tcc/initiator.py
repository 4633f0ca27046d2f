"""The TCC initiator: begins a global transaction at the coordinator, registers its
branches, calls every Try itself, then commits, or cancels on any failure.

::

    tcc = Initiator("http://rmsg:8470", token=ORDER_TOKEN)
    async with tcc.transaction(timeout=30) as tx:
        await tx.try_all([
            Branch("order", "order-7", {"order_id": 7}),  # the initiator's own local step
            Branch("inventory", "stock-7", {"sku": "A-1", "qty": 2}),
            Branch("credit", "points-7", {"member": 42, "points": 10}),
        ])
    # committed: the coordinator confirms every branch, retrying until each answers 200

A clean exit of the block commits; an exception cancels, then goes on up. A Try answered
409 raises :class:`TryRefused` (a business refusal: out of stock), any other failure
:class:`TryFailed`; either (or a failed registration) dooms the transaction, so the exit
cancels it even if the block caught the error, and raises it again. After the commit or
the cancel the coordinator drives every branch's Confirm or Cancel on its own (an
initiator that dies mid-block leaves its transaction to the deadline, which cancels it).

The initiator's own local step is a branch like the others: the initiator serves a
:class:`~reliable_msg.sdk.tcc.Participant` of its own (its Try marks the order
UPDATING, its Confirm PAYED, its Cancel CANCELED), declared to the coordinator as one
more ``[participants.<name>]``. So its effect, too, is all-or-nothing with the others,
behind the same barrier.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp

from reliable_msg.errors import (
    Code,
    Conflict,
    ReliableMsgError,
    TryFailed,
    TryRefused,
)
from reliable_msg.sdk.client import RetryPolicy, ServiceClient
from reliable_msg.tcc import BRANCH_HEADER, GID_HEADER, OP_HEADER, Op, call_body, unproved

log = logging.getLogger(__name__)

#: The statuses a global transaction ends in.
FINAL = ("confirmed", "cancelled")
#: The most of a participant's answer to a Try that is read, in bytes.
MAX_ANSWER = 64 * 1024


@dataclass(frozen=True, slots=True)
class Branch:
    """One branch of a global transaction: its participant (a ``[participants.<name>]``
    of the coordinator's configuration), its id within the transaction, and the payload
    every call of its Try, Confirm and Cancel carries."""

    participant: str
    branch: str
    payload: Any = None

    def body(self) -> dict[str, Any]:
        return {"participant": self.participant, "branch": self.branch, "payload": self.payload}


class GlobalTransaction:
    """A global transaction in an ``async with`` block of :meth:`Initiator.transaction`."""

    def __init__(self, initiator: Initiator, gid: str, state: dict[str, Any]) -> None:
        self._initiator = initiator
        self.gid = gid
        #: The coordinator's last answer about this transaction (its JSON).
        self.state = state
        #: The first failure of :meth:`try_all`: the transaction can only be cancelled.
        self.failure: Exception | None = None

    @property
    def status(self) -> str:
        """The status the coordinator last gave: ``trying``, ``confirming``, ..."""
        return str(self.state.get("status", ""))

    async def branch(self, participant: str, branch: str, payload: Any = None) -> None:
        """Register one branch and run its Try (:meth:`try_all` of one)."""
        await self.try_all([Branch(participant, branch, payload)])

    async def try_all(self, branches: Sequence[Branch]) -> None:
        """Register ``branches`` in one call, then run their Trys concurrently.

        Returns once every Try answered 2xx. The first Try to fail stops the others
        still in flight and is raised: :class:`TryRefused` for a 409, :class:`TryFailed`
        otherwise. A stopped Try may still reach its participant; the Cancel undoes it,
        or, arriving first, is recorded as an empty rollback that refuses the late Try.

        Any failure here (a registration's too: it may have been taken with its answer
        lost) dooms the transaction: the block's exit cancels it and raises the failure,
        even if the block caught it, since a branch whose Try did not run must never be
        confirmed.
        """
        if self.failure is not None:
            raise self.failure
        try:
            await self._try_all(branches)
        except Exception as exc:
            self.failure = exc
            raise

    async def _try_all(self, branches: Sequence[Branch]) -> None:
        answer = await self._initiator.client.call(
            "POST",
            f"/v1/tcc/transactions/{self.gid}/branches",
            {"branches": [b.body() for b in branches]},
        )
        calls = [
            asyncio.create_task(self._initiator.call_try(self.gid, branch, registered))
            for branch, registered in zip(branches, answer["branches"], strict=True)
        ]
        try:
            # in the order they end: the first failure to happen is raised, not the first
            # of the list (which may have failed later, once the others were doomed)
            for ended in asyncio.as_completed(calls):
                await ended
        finally:
            for call in calls:
                call.cancel()
            await asyncio.gather(*calls, return_exceptions=True)

    async def wait(self, *, poll: float = 0.05, max_poll: float = 1.0) -> str:
        """Wait until the coordinator has confirmed or cancelled every branch; return
        ``confirmed`` or ``cancelled``. No bound of its own: wrap it in
        :func:`asyncio.timeout` (a participant that never comes back keeps it waiting)."""
        while self.status not in FINAL:
            await asyncio.sleep(poll)
            poll = min(poll * 2, max_poll)
            self.state = await self._initiator.get(self.gid)
        return self.status

    async def _commit(self) -> None:
        self.state = await self._initiator.client.call(
            "POST", f"/v1/tcc/transactions/{self.gid}/commit"
        )

    async def _cancel(self) -> None:
        """Ask for the cancel; when it cannot be asked, the deadline cancels all the same."""
        try:
            self.state = await self._initiator.client.call(
                "POST", f"/v1/tcc/transactions/{self.gid}/cancel"
            )
        except ReliableMsgError as exc:
            log.warning(
                "could not cancel global transaction %s (%s); its deadline will",
                self.gid,
                exc,
                extra={"gid": self.gid},
            )


class Initiator:
    """Begins global transactions at the coordinator and calls their Trys.

    ``base_url``, ``token`` (a producer's) and ``retry`` make the
    :class:`~reliable_msg.sdk.client.ServiceClient` its calls to the coordinator go
    through (retried on outages; every one is idempotent), or give ``client``.
    ``try_timeout`` bounds each Try, connect to last byte.
    """

    def __init__(
        self,
        base_url: str | Sequence[str] | None = None,
        token: str | None = None,
        *,
        retry: RetryPolicy | None = None,
        client: ServiceClient | None = None,
        try_timeout: float = 10.0,
    ) -> None:
        if client is None:
            if base_url is None or token is None:
                raise ValueError("Initiator needs base_url and token, or a client")
            client = ServiceClient(base_url, token, retry=retry)
        self.client = client
        self.try_timeout = try_timeout
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Initiator:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.client.close()
        if self._session is not None:
            await self._session.close()
            self._session = None

    @asynccontextmanager
    async def transaction(
        self,
        gid: str | None = None,
        *,
        timeout: float = 60.0,  # noqa: ASYNC109 - the coordinator's deadline, not this call's
        wait: bool = False,
    ) -> AsyncIterator[GlobalTransaction]:
        """Begin global transaction ``gid`` (a new one by default), whose Trys and commit
        must happen within ``timeout`` seconds (else the coordinator cancels it); commit
        it on a clean exit of the block, cancel it on an exception (then raise it).
        With ``wait``, the exit also waits until every branch is confirmed or cancelled.

        Beginning a ``gid`` again with the same ``timeout`` is allowed while it is
        ``trying`` (a retried begin); once committed or cancelled it raises
        :class:`Conflict` (``committed`` or ``rolled_back``) before the block runs.
        """
        gid = gid or uuid.uuid4().hex
        state = await self.client.call(
            "POST", "/v1/tcc/transactions", {"gid": gid, "timeout": float(timeout)}
        )
        tx = GlobalTransaction(self, gid, state)
        _refuse_decided(tx)
        try:
            yield tx
        except BaseException:
            await tx._cancel()
            if wait:
                await tx.wait()
            raise
        if tx.failure is not None:  # caught in the block: the transaction still fails
            await tx._cancel()
            if wait:
                await tx.wait()
            raise tx.failure
        await tx._commit()
        if wait:
            await tx.wait()

    async def get(self, gid: str) -> dict[str, Any]:
        """The coordinator's view of ``gid``: status, branches, events."""
        return await self.client.call("GET", f"/v1/tcc/transactions/{gid}")

    async def call_try(self, gid: str, branch: Branch, registered: dict[str, Any]) -> None:
        """POST ``branch``'s Try to the URL the coordinator gave, with its proof."""
        bearer = str(registered["proof"])
        headers = {
            GID_HEADER: gid,
            BRANCH_HEADER: branch.branch,
            OP_HEADER: Op.TRY.value,
            "Authorization": f"Bearer {bearer}",
            "Content-Type": "application/json",
        }
        body = call_body(gid, branch.branch, Op.TRY, branch.payload)
        where = f"Try of {gid}/{branch.branch} at {branch.participant}"
        try:
            async with self._http().post(
                registered["try_url"], data=body, headers=headers, allow_redirects=False
            ) as response:
                status = response.status
                raw = await response.content.read(MAX_ANSWER)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            # str, not repr: a ClientResponseError's repr holds the request's headers
            why = unproved(f"{type(exc).__name__}: {exc}".rstrip(": "), bearer)
            raise TryFailed(
                f"{where}: no answer ({why})",
                participant=branch.participant,
                branch=branch.branch,
            ) from exc
        if status < 300:
            return
        answer = _error_answer(raw)
        said = f"{answer.get('code', '')}: {answer.get('message', '')}".strip(": ")
        if status == 409:
            raise TryRefused(
                f"{where} refused: {said}",
                participant=branch.participant,
                branch=branch.branch,
                answer=answer,
            )
        raise TryFailed(
            f"{where} answered HTTP {status} {said}".rstrip(),
            participant=branch.participant,
            branch=branch.branch,
            http_status=status,
            answer=answer,
        )

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.try_timeout)
            )
        return self._session


def _refuse_decided(tx: GlobalTransaction) -> None:
    """A begin repeated once the transaction was decided cannot run its block again."""
    if tx.status in ("confirming", "confirmed"):
        raise Conflict(f"global transaction {tx.gid} is {tx.status}", code=Code.COMMITTED)
    if tx.status in ("cancelling", "cancelled"):
        raise Conflict(f"global transaction {tx.gid} is {tx.status}", code=Code.ROLLED_BACK)


def _error_answer(raw: bytes) -> dict[str, Any]:
    """The ``{"code", "message"}`` of a participant's error answer, or ``{}``."""
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return {}
    error = value.get("error") if isinstance(value, dict) else None
    return error if isinstance(error, dict) else {}
