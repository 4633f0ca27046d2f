"""The initiator SDK's Try calls against the real coordinator (the runtime served on a
localhost port) and real participants: what goes on the wire, and what its errors hold."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import asyncpg
import pytest

from reliable_msg.errors import TryFailed
from reliable_msg.harness.ports import free_port
from reliable_msg.sdk.tcc import Branch, Initiator
from reliable_msg.service.settings import Settings, TccSettings
from reliable_msg.service.usecases import payload_text
from reliable_msg.tcc import Op, proof
from tests.conftest import PRODUCER
from tests.helpers.tcc import TOKENS, participant, reset, sdk_app, serving


@pytest.fixture
def ports() -> dict[str, int]:
    return {name: free_port() for name in TOKENS}


@pytest.fixture
def settings(make_settings: Callable[..., Settings], ports: dict[str, int]) -> Settings:
    """``inventory`` served by the SDK's participant; ``credit`` by a malformed server."""
    return make_settings(
        max_request_bytes=1024 * 1024,  # the registration of a payload at the limit
        participants={
            name: {"url": f"http://127.0.0.1:{port}/{name}", "token": TOKENS[name]}
            for name, port in ports.items()
        },
    )


@pytest.fixture
async def tcc_db(db: asyncpg.Connection) -> asyncpg.Connection:
    await reset(db)
    return db


@pytest.fixture
async def initiator(service_url: str, tcc_db: asyncpg.Connection) -> AsyncIterator[Initiator]:
    async with Initiator(service_url, PRODUCER) as tcc:
        yield tcc


async def test_a_non_ascii_payload_at_the_coordinator_s_limit_is_tried(
    pool: asyncpg.Pool, tcc_db: asyncpg.Connection, ports: dict[str, int], initiator: Initiator
) -> None:
    """The coordinator takes a payload up to tcc.max_payload_bytes as compact UTF-8 JSON;
    the Try must carry it so, within the default participant's body bound: aiohttp's
    default encoding (\\uXXXX escapes) made it twice as long, 413, TryFailed every time."""
    limit = TccSettings().max_payload_bytes
    payload = {"note": "数" * ((limit - 11) // 3)}
    assert limit - 3 < len(payload_text(payload).encode()) <= limit
    port = ports["inventory"]
    async with serving(sdk_app(participant(pool, "inventory")), port):
        async with initiator.transaction(timeout=30) as tx:
            await tx.try_all([Branch("inventory", "b1", payload)])
    assert tx.status in ("confirming", "confirmed")  # the commit kicked the driver
    rows = await tcc_db.fetch("SELECT participant, gid, branch, op FROM tcc_effects")
    assert ("inventory", tx.gid, "b1", "try") in [tuple(r) for r in rows]


@pytest.fixture
async def malformed(ports: dict[str, int]) -> AsyncIterator[None]:
    """``credit`` answering every call with a malformed HTTP response: aiohttp raises a
    ClientResponseError, whose repr holds the request's headers (the Try's proof)."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nBad Header Line\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", ports["credit"])
    async with server:
        yield


async def test_a_malformed_try_answer_leaks_no_proof_into_try_failed(
    malformed: None, initiator: Initiator
) -> None:
    """TryFailed is what the application logs: the proof opens this Try for anyone."""
    with pytest.raises(TryFailed) as failed:
        async with initiator.transaction("leak-try", timeout=30) as tx:
            await tx.try_all([Branch("credit", "b1", {"points": 10})])
    secret = proof(TOKENS["credit"], "leak-try", "b1", Op.TRY)
    error = failed.value
    assert (error.participant, error.branch, error.http_status) == ("credit", "b1", None)
    assert str(error).startswith("Try of leak-try/b1 at credit: no answer (")
    assert secret not in str(error) and "Authorization" not in str(error)
    assert secret not in repr(error) and secret not in error.message
    assert tx.status == "cancelling"
