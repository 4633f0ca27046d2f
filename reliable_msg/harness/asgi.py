"""Serving an ASGI app on a real localhost port inside the caller's event loop."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import uvicorn

from .ports import free_port


@asynccontextmanager
async def serving_app(app: Any, port: int | None = None, **options: Any) -> AsyncIterator[str]:
    """Serve ``app`` on 127.0.0.1 (on ``port`` or a free one) and yield its base URL;
    ``options`` go to :class:`uvicorn.Config` (``forwarded_allow_ips``, say)."""
    port = port or free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", lifespan="off", **options
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
