"""The HTTP encryption service (``kmsguard serve``): FastAPI on uvicorn. Needs ``kmsguard[server]``.

``create_app(settings)`` returns the ASGI application; docs/service.md describes the API.
"""

from kmsguard.server.app import create_app
from kmsguard.server.settings import ServerSettings

__all__ = ["ServerSettings", "create_app"]
