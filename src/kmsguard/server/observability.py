"""What the service adds to its worker's metrics: requests by route and status, and key rotation.

``kmsguard_http_requests_total{method, route, status}`` counts every answered request
(``route`` is the matched path template, ``/v1/encrypt``, never the raw path, so a
caller cannot mint label values). ``kmsguard_key_rotation_enabled`` is refreshed in the
background from ``KeyAdmin.status`` (AWS backend), at start and every
``KEY_STATUS_SECONDS``: rotation is a property of the key that changes rarely, and
reading it costs two KMS calls per classification and region.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from starlette.types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from kmsguard.config import Settings
    from kmsguard.telemetry import Telemetry

log = logging.getLogger("kmsguard.server")

#: Seconds between two reads of the keys' rotation status.
KEY_STATUS_SECONDS = 3600.0


class RequestMetricsMiddleware:
    """Reports each answered request to the worker's ``Service.telemetry`` (a no-op when metrics are off)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 0

        async def record_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        finally:
            service = getattr(getattr(scope.get("app"), "state", None), "service", None)
            telemetry = getattr(service, "telemetry", None)
            if telemetry is not None and status:
                route = getattr(scope.get("route"), "path", "unmatched")
                telemetry.http_request(scope["method"], route, str(status))


async def watch_key_rotation(settings: Settings, telemetry: Telemetry) -> None:
    """Report every classification's key rotation to ``telemetry``, now and every KEY_STATUS_SECONDS."""
    from kmsguard.aws import AwsSettings, ClientFactory
    from kmsguard.aws.admin import KeyAdmin

    aws = AwsSettings.from_section(settings.section("aws"), settings.env, settings.environment)
    admin = KeyAdmin(ClientFactory(aws))
    loop = asyncio.get_running_loop()
    while True:
        try:
            rows = await loop.run_in_executor(None, admin.status, list(settings.policy))
            telemetry.key_statuses(rows)
        except Exception as exc:  # a status read that fails leaves the last values; the next one retries
            log.warning("could not read the keys' rotation status (%s)", type(exc).__name__)
        await asyncio.sleep(KEY_STATUS_SECONDS)
