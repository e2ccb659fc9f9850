"""Two ASGI middlewares every request passes: its request id, and the body-size limit.

Plain ASGI rather than Starlette's BaseHTTPMiddleware: they add a header and count
bytes, and must not buffer a body or a response to do it.
"""

from __future__ import annotations

import json
import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kmsguard import operation
from kmsguard.errors import KmsGuardError, RequestTooLarge

#: A caller's own X-Request-Id is echoed when it is this shape; anything else is replaced.
_CALLER_ID_RE = re.compile(rb"[A-Za-z0-9._:/+=-]{1,128}")


class RequestIdMiddleware:
    """Gives each request a kmsguard request id and runs it under ``operation.serving``.

    The audit records of the request's operations carry that id; the response carries it
    as ``X-Audit-Request-Id``, and as ``X-Request-Id`` unless the caller sent its own
    X-Request-Id, which is echoed instead (so a caller's tracing id comes back unchanged,
    and the audit id says which records the request made).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        number, audit_id = operation.new_request_id()
        own = audit_id.encode("ascii")
        echoed = own
        for name, value in scope["headers"]:
            if name == b"x-request-id" and _CALLER_ID_RE.fullmatch(value):
                echoed = value
        scope.setdefault("state", {})["request_id"] = audit_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                headers.append((b"x-request-id", echoed))
                headers.append((b"x-audit-request-id", own))
                message["headers"] = headers
            await send(message)

        with operation.serving(number):
            await self.app(scope, receive, send_with_id)


class BodyLimitMiddleware:
    """Answers 413 REQUEST_TOO_LARGE for a body over ``max_bytes``, without reading it whole.

    A Content-Length over the limit is refused before any byte is read. A chunked body is
    counted as it arrives; once over, the application is told the client went away and
    its answer is replaced by the 413.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared > self.max_bytes:
                    await send_error(send, RequestTooLarge(f"the body is over {self.max_bytes} bytes"))
                    return
        seen = 0
        over = False
        started = False

        async def counting_receive() -> Message:
            nonlocal seen, over
            if over:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    over = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if over:
                if not started:
                    started = True
                    await send_error(send, RequestTooLarge(f"the body is over {self.max_bytes} bytes"))
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        await self.app(scope, counting_receive, guarded_send)
        if over and not started:
            await send_error(send, RequestTooLarge(f"the body is over {self.max_bytes} bytes"))


async def send_error(send: Send, error: KmsGuardError) -> None:
    """Answer ``error`` in the service's JSON shape, straight on ASGI."""
    body = json.dumps({"error": error.to_dict()}).encode("utf-8")
    await send(
        {
            "type": "http.response.start",
            "status": error.http_status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
