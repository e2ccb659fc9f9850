"""The HTTP encryption service (``kmsguard serve``): FastAPI on uvicorn. Needs ``kmsguard[server]``.

``create_app(settings)`` returns the ASGI application; docs/service.md describes the API.
Both names are imported on first use: ``kmsguard apikey`` needs only ``kmsguard.server.apikeys``,
and must not pay for importing FastAPI and building the application's models.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kmsguard.server.app import create_app
    from kmsguard.server.settings import ServerSettings

__all__ = ["ServerSettings", "create_app"]


def __getattr__(name: str) -> object:
    if name == "create_app":
        from kmsguard.server.app import create_app

        return create_app
    if name == "ServerSettings":
        from kmsguard.server.settings import ServerSettings

        return ServerSettings
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
