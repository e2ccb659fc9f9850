"""``create_app(settings)``: the service's ASGI application, for uvicorn, gunicorn or a test.

One application per worker process. Its lifespan builds the worker's Guard (so each
worker has its own audit writer and data-key cache) and closes it at shutdown, after
the server has let in-flight requests finish: every 2xx answered has its audit record
in the spool, flushed towards the sink by ``Guard.close``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from kmsguard import __version__
from kmsguard.config import Settings, load_settings
from kmsguard.guard import Guard
from kmsguard.server import errors
from kmsguard.server.middleware import BodyLimitMiddleware, RequestIdMiddleware
from kmsguard.server.routers import crypto, health
from kmsguard.server.settings import ServerSettings
from kmsguard.server.state import Service


def create_app(settings: Settings, server: ServerSettings | None = None, guard: Guard | None = None) -> FastAPI:
    """The application for ``settings`` (``[server]`` read from them unless ``server`` is given).

    ``guard``: serve this Guard instead of building one (it is closed at shutdown all the same).
    Configuration errors are raised here, before anything listens.
    """
    server = server if server is not None else ServerSettings.of(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service = Service.build(settings, server, guard)
        app.state.service = service
        service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(
        title="kmsguard",
        version=__version__,
        summary="Envelope encryption of classified data as a service",
        lifespan=lifespan,
    )
    errors.install(app)
    app.include_router(crypto.router)
    app.include_router(health.router)
    app.add_middleware(BodyLimitMiddleware, max_bytes=server.max_request_bytes)
    app.add_middleware(RequestIdMiddleware)  # outermost: even a 413 carries the request id
    return app


def app_from_env() -> FastAPI:
    """The factory ``kmsguard serve`` hands uvicorn: each worker reads the settings itself."""
    return create_app(load_settings())
