"""Two ASGI middlewares every request passes: its request id, and the body-size limit.

Plain ASGI rather than Starlette's BaseHTTPMiddleware: they add a header and count
bytes, and must not buffer a body or a response to do it.
"""

from __future__ import annotations

import json
import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kmsguard import operation
from kmsguard.audit.record import REQUEST_ID
from kmsguard.errors import KmsGuardError, RequestTooLarge

_CALLER_ID_RE = re.compile(REQUEST_ID.pattern.encode("ascii"))


class RequestIdMiddleware:
    """Runs each request under its request id (``operation.serving``) and answers it as ``X-Request-Id``.

    The id is the caller's own ``X-Request-Id`` when it is a valid audit request id
    (kmsguard.audit.record.REQUEST_ID); otherwise — none sent, or one too long or with
    other characters — one kmsguard makes. Either way the audit records of the request's
    operations carry it, and the answer says which it was.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        caller_id: str | None = None
        for name, value in scope["headers"]:
            if name == b"x-request-id" and _CALLER_ID_RE.fullmatch(value):
                caller_id = value.decode("ascii")
        request: int | str
        if caller_id is None:
            request, request_id = operation.new_request_id()
        else:
            request = request_id = caller_id
        echoed = request_id.encode("ascii")

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), (b"x-request-id", echoed)]
            await send(message)

        with operation.serving(request):
            await self.app(scope, receive, send_with_id)


class BodyLimitMiddleware:
    """Answers 413 REQUEST_TOO_LARGE for a body over ``max_bytes``, without reading it whole.

    A Content-Length over the limit is refused before any byte is read. A chunked body is
    counted as it arrives; once over, the application is told the client went away and
    its answer is replaced by the 413, whatever it did with that news: a route that reads
    the body itself (the batches, ``request.body()``) raises Starlette's ClientDisconnect,
    which is not a failure of the service but this cut, so it too answers the 413.
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

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if not over:
                raise
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
