"""``python -m demo.tcc <participant> [--host H] [--port P]``: serve one participant of
the TCC shop (``order`` also pays orders as the initiator).

Environment: ``DEMO_DATABASE_URL`` (its schema is ``tcc_<participant>``),
``DEMO_TCC_TOKEN`` (its ``[participants.<name>]`` token), the faults of
:class:`demo.tcc.shop.Faults`; for ``order`` also ``DEMO_SERVICE_URL`` (the coordinator),
``DEMO_ORDER_TOKEN`` (the producer token it begins transactions with),
``DEMO_TCC_TIMEOUT`` (each transaction's deadline, seconds) and ``DEMO_TCC_TRY_TIMEOUT``
(each Try's).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os

import asyncpg
import uvicorn

from reliable_msg.sdk.client import RetryPolicy
from reliable_msg.sdk.tcc import Initiator

from ..options import DEFAULT_DATABASE_URL
from .books import SCHEMAS
from .shop import PARTICIPANTS, Faults, create_app

#: The initiator's calls to the coordinator: retried briefly, so that a pay answers soon.
RETRY = RetryPolicy(attempts=4, initial=0.1, max_wait=0.5, deadline=3.0)


def _env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise SystemExit(f"demo.tcc: set {name}")
    return value


async def serve(name: str, host: str, port: int) -> None:
    pool = await asyncpg.create_pool(
        os.environ.get("DEMO_DATABASE_URL", DEFAULT_DATABASE_URL),
        min_size=1,
        max_size=8,
        server_settings={"search_path": SCHEMAS[name]},
    )
    initiator = None
    if name == "order":
        initiator = Initiator(
            _env("DEMO_SERVICE_URL"),
            _env("DEMO_ORDER_TOKEN"),
            retry=RETRY,
            try_timeout=float(os.environ.get("DEMO_TCC_TRY_TIMEOUT", "2")),
        )
    app = create_app(
        name,
        pool,
        _env("DEMO_TCC_TOKEN"),
        Faults.from_env(),
        initiator=initiator,
        timeout=float(os.environ.get("DEMO_TCC_TIMEOUT", "5")),
    )
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="info"))
    try:
        await server.serve()
    finally:
        if initiator is not None:
            await initiator.close()
        await pool.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m demo.tcc", description=__doc__)
    parser.add_argument("participant", choices=PARTICIPANTS)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    asyncio.run(serve(args.participant, args.host, args.port))


if __name__ == "__main__":
    main()
