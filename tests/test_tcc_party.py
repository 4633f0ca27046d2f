"""The harness's TCC participant as the tools run it: a process of its own over its
schema in the database it is given, its account moved by Try, Confirm and Cancel, each
run logged once, and its schema kept when it starts again."""

from __future__ import annotations

import subprocess
from pathlib import Path

import asyncpg
import httpx
import pytest

from reliable_msg.errors import ConfigError
from reliable_msg.harness import tcc_party
from reliable_msg.harness.ports import free_port
from reliable_msg.harness.process import Process, stop, wait_ready
from reliable_msg.harness.tcc_party import Run, Tally
from reliable_msg.sdk.tcc import Op
from reliable_msg.tcc import BRANCH_HEADER, GID_HEADER, OP_HEADER, call_body, proof

TOKEN = "party-test-token"
NAME = "party_test"


async def call(
    http: httpx.AsyncClient,
    op: Op,
    gid: str,
    qty: object,
    *,
    token: str = TOKEN,
    payload: object = None,
) -> httpx.Response:
    """One signed call of branch ``b1`` of ``gid``, as the coordinator makes it (its
    payload ``{"qty": qty}`` unless ``payload`` is given)."""
    return await http.post(
        f"{tcc_party.path(NAME)}/{op.value}",
        content=call_body(gid, "b1", op, {"qty": qty} if payload is None else payload),
        headers={
            GID_HEADER: gid,
            BRANCH_HEADER: "b1",
            OP_HEADER: op.value,
            "Authorization": f"Bearer {proof(token, gid, 'b1', op)}",
            "Content-Type": "application/json",
        },
    )


async def started(database_url: str, tmp_path: Path) -> tuple[Process, str]:
    port = free_port()
    env = {"RMSG_PARTY_TOKEN": TOKEN, "PATH": "/usr/bin:/bin"}
    argv = tcc_party.argv(NAME, port, database_url, start=10)
    process = Process(NAME, argv, env, tmp_path / "party.log")
    process.start()
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_ready(url, process, within=30)
    except BaseException:
        stop([process])
        raise
    return process, url


async def test_a_party_process_runs_each_call_once_and_keeps_its_books_across_a_restart(
    database_url: str, tmp_path: Path
) -> None:
    conn = await asyncpg.connect(database_url)
    await tcc_party.drop(conn, NAME)
    try:
        process, url = await started(database_url, tmp_path)
        try:
            async with httpx.AsyncClient(base_url=url, timeout=10) as http:
                assert (await call(http, Op.TRY, "g1", 3)).status_code == 200
                assert (await call(http, Op.CONFIRM, "g1", 3)).json() == {"outcome": "done"}
                again = await call(http, Op.CONFIRM, "g1", 3)
                assert again.json() == {"outcome": "duplicate"}
                refused = await call(http, Op.TRY, "g2", 8)  # 7 left
                assert refused.status_code == 409, refused.text
                assert refused.json()["error"]["code"] == "refused"
                empty = await call(http, Op.CANCEL, "g3", 1)
                assert empty.json() == {"outcome": "empty_rollback"}
        finally:
            stop([process])
        assert await tcc_party.account(conn, NAME) == (7, 0, 3)
        counted = await tcc_party.tally(conn, [NAME])
        assert counted == {Run(NAME, "g1", "b1", "try"): 1, Run(NAME, "g1", "b1", "confirm"): 1}
        assert counted.twice() == []

        process, url = await started(database_url, tmp_path)  # its schema is there already
        try:
            async with httpx.AsyncClient(base_url=url, timeout=10) as http:
                assert (await call(http, Op.TRY, "g4", 2)).status_code == 200
                assert (await call(http, Op.CANCEL, "g4", 2)).json() == {"outcome": "done"}
        finally:
            stop([process])
        assert await tcc_party.account(conn, NAME) == (7, 0, 3)
        assert (await tcc_party.tally(conn, [NAME])).ops("g4") == {
            (NAME, "b1"): {"try": 1, "cancel": 1}
        }
    finally:
        await tcc_party.drop(conn, NAME)
        await conn.close()


async def test_a_try_whose_qty_is_no_count_it_can_hold_is_refused_and_moves_nothing(
    database_url: str,
) -> None:
    bad: list[object] = [
        [3],  # not an object at all
        "3",
        {},
        {"qty": None},
        {"qty": -3},  # would "freeze" -3: available up, frozen below 0
        {"qty": 0},
        {"qty": True},  # a bool is an int to Python and to asyncpg: it froze 1
        {"qty": "3"},
        {"qty": 1.5},
        {"qty": 2**31},
    ]
    async with tcc_party.serving_party(database_url, NAME, start=10) as party:
        token = party.token
        base = party.url.removesuffix(tcc_party.path(NAME))
        async with httpx.AsyncClient(base_url=base, timeout=10) as http:
            for n, payload in enumerate(bad):
                gid = f"bad{n}"
                refused = await call(http, Op.TRY, gid, None, token=token, payload=payload)
                assert refused.status_code == 409, (payload, refused.text)
                assert refused.json()["error"]["code"] == "refused", payload
                assert "qty" in refused.json()["error"]["message"], payload
                # its Cancel, with the same payload, finds no Try to give back
                cancel = await call(http, Op.CANCEL, gid, None, token=token, payload=payload)
                assert cancel.json() == {"outcome": "empty_rollback"}, payload
            assert (await call(http, Op.TRY, "good", 4, token=token)).status_code == 200
        assert await party.account() == (6, 4, 0)
        conn = await asyncpg.connect(database_url)
        try:
            assert await tcc_party.tally(conn, [NAME]) == {Run(NAME, "good", "b1", "try"): 1}
        finally:
            await conn.close()


def test_a_party_named_what_no_schema_can_be_is_refused_at_start() -> None:
    argv = tcc_party.argv("Robert'); DROP", 9, "postgresql://127.0.0.1:9/x")
    done = subprocess.run(
        argv, env={"RMSG_PARTY_TOKEN": TOKEN}, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert "lowercase letters, digits and _ only" in done.stderr


def test_the_tally_names_each_handler_that_ran_more_than_once() -> None:
    counted = Tally(
        {
            Run("credit", "g1", "b2", "confirm"): 2,
            Run("credit", "g1", "b2", "try"): 1,
            Run("wms", "g2", "b1", "cancel"): 1,
        }
    )
    assert counted.twice() == [(Run("credit", "g1", "b2", "confirm"), 2)]
    assert counted.gids() == {"g1", "g2"}
    assert counted.ops("g1") == {("credit", "b2"): {"confirm": 2, "try": 1}}


@pytest.mark.parametrize("name", ["", "Inventory", "9lives", "a-b", "x" * 41, "ok\n"])
def test_a_name_that_cannot_be_a_schema_is_a_config_error(name: str) -> None:
    with pytest.raises(ConfigError):
        tcc_party.schema(name)
