"""``python -m upstream_demo [--host H] [--port P]``: run the order service."""

from __future__ import annotations

import argparse
import asyncio
import logging

import uvicorn

from reliable_msg.sdk.producer import Producer

from . import store
from .app import create_app
from .config import Config
from .faults import CrashingClient


async def serve(host: str, port: int) -> None:
    config = Config.from_env()
    pool = await store.connect(config.database_url)
    async with pool.acquire() as conn:
        await store.install(conn)
    client = CrashingClient(config.service_url, config.token)
    producer = Producer(config.service_url, config.token, client=client)
    app = create_app(pool, producer, client, config.token)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="info"))
    await server.serve()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m upstream_demo", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8481)
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
