"""Who is calling: the bearer API key, checked against the store, its scopes and its rate limit."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from kmsguard import operation
from kmsguard.errors import AccessDenied, ApiKeysUnavailable, Unauthenticated
from kmsguard.server.apikeys import REVOCATION_SECONDS, ApiKey
from kmsguard.server.settings import is_loopback
from kmsguard.server.state import Service


@dataclass(frozen=True)
class Caller:
    """The API key behind a request; ``key`` None when the service runs with ``auth = "none"``."""

    key: ApiKey | None

    @property
    def name(self) -> str | None:
        return self.key.name if self.key is not None else None

    def require(self, operation: str, classification: str | None = None) -> None:
        """ACCESS_DENIED unless a scope covers ``operation`` on ``classification`` (None: on any)."""
        if self.key is not None and not self.key.allows(operation, classification):
            target = f"{classification!r} data" if classification else "anything"
            raise AccessDenied(f"this API key may not {operation} {target}")

    @contextlib.contextmanager
    def acting(self) -> Iterator[None]:
        """Guard operations inside run as the API key's name (``operation.acting_as``), so the
        audit record names the key; without auth, as the service itself."""
        if self.name is None:
            yield
            return
        with operation.acting_as(self.name):
            yield


def service_of(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


async def caller(request: Request) -> Caller:
    """The dependency of every authenticated endpoint: 401 without a live key, 429 over its rate,
    503 API_KEYS_UNAVAILABLE when the keys could not be checked within the revocation promise.
    With ``auth = "none"``: 403 ACCESS_DENIED for a request that did not arrive on a loopback
    address (ASGI ``scope["server"]``), whatever server runs the app.

    It reads the store's keys from memory only; ``Service`` reloads them in the background.
    """
    service = service_of(request)
    if service.keys is None:
        # [server] host was checked at start, but create_app may be served by another
        # server bound elsewhere: the address this request arrived on decides.
        server = request.scope.get("server")
        if not server or not is_loopback(str(server[0])):
            raise AccessDenied('auth = "none" serves only requests that arrive on a loopback address; '
                               "serve this address with API keys")
        return Caller(None)
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise Unauthenticated()
    if service.keys.age() > REVOCATION_SECONDS:  # a key revoked since could still pass: refuse them all
        raise ApiKeysUnavailable()
    key = service.keys.lookup(token.strip())
    if key is None:
        raise Unauthenticated("the API key is not valid (unknown or revoked)")
    service.buckets.take(key.name)
    return Caller(key)


#: The caller of an endpoint that needs an API key (FastAPI resolves it before the body's checks).
Authorized = Annotated[Caller, Depends(caller)]
