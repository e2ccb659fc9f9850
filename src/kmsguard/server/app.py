"""``create_app(settings)``: the service's ASGI application, for uvicorn, gunicorn or a test.

One application per worker process. Its lifespan builds the worker's Guard (so each
worker has its own audit writer and data-key cache) and closes it at shutdown, after
the server has let in-flight requests finish: every 2xx answered has its audit record
in the spool, flushed towards the sink by ``Guard.close``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from kmsguard import __version__
from kmsguard.config import Settings, load_settings
from kmsguard.guard import Guard
from kmsguard.server import errors
from kmsguard.server.middleware import BodyLimitMiddleware, RequestIdMiddleware
from kmsguard.server.observability import RequestMetricsMiddleware
from kmsguard.server.routers import crypto, fields, health, selftest
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
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    errors.install(app)
    app.include_router(crypto.router)
    app.include_router(fields.router)
    app.include_router(health.router)
    app.include_router(selftest.router)
    app.add_middleware(BodyLimitMiddleware, max_bytes=server.max_request_bytes)
    app.add_middleware(RequestMetricsMiddleware)  # outside the body limit: a 413 is counted too
    app.add_middleware(RequestIdMiddleware)  # outermost: even a 413 carries the request id
    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document without its 422 answers: this service answers bad input 400 INVALID_INPUT."""
    if app.openapi_schema is None:
        doc = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        for path in doc.get("paths", {}).values():
            for operation in path.values():
                operation.get("responses", {}).pop("422", None)
        for unused in ("HTTPValidationError", "ValidationError"):
            doc.get("components", {}).get("schemas", {}).pop(unused, None)
        app.openapi_schema = doc
    return app.openapi_schema


def app_from_env() -> FastAPI:
    """The factory ``kmsguard serve`` hands uvicorn: each worker reads the settings itself."""
    return create_app(load_settings())
