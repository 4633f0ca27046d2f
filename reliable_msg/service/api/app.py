"""The FastAPI app of the service: its lifespan, middleware, error answers and routers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from reliable_msg.service import dashboard
from reliable_msg.service.api import admin, deliveries, messages, probes, tcc
from reliable_msg.service.api.errors import ERRORS, BodyLimit, install_error_handlers
from reliable_msg.service.runtime import Runtime


def create_app(runtime: Runtime, *, manage: bool = False) -> FastAPI:
    """The FastAPI app over ``runtime``; with ``manage`` its lifespan starts and stops it."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if manage:
            await runtime.start()
        try:
            yield
        finally:
            if manage:
                await runtime.stop()

    app = FastAPI(
        title="reliable-msg",
        version="1",
        lifespan=lifespan,
        responses=ERRORS,
    )
    app.state.runtime = runtime
    app.add_middleware(BodyLimit, limit=runtime.settings.max_request_bytes)
    install_error_handlers(app)
    routers = [messages.router, deliveries.router, admin.router, tcc.router, probes.router]
    # for the Allow header of a 405
    app.state.api_routes = [route for router in routers for route in router.routes]
    for router in routers:
        app.include_router(router)
    app.include_router(dashboard.router())
    return app
