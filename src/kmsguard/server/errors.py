"""The service's one error shape: ``{"error": {"code", "message", "retryable"}}``.

Every kmsguard error answers its ``http_status``; a body that is not valid JSON, a
missing field or a wrong type answers 400 INVALID_INPUT naming the field (not FastAPI's
422 list); unknown routes and wrong methods answer 404 NOT_FOUND and 405
METHOD_NOT_ALLOWED; RATE_LIMITED carries Retry-After and 401 carries
WWW-Authenticate. Anything unforeseen answers 500 INTERNAL_ERROR with a fixed message:
no traceback, no exception text (which could hold data) ever reaches a response.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from kmsguard.errors import KmsGuardError, RateLimited, Unauthenticated

log = logging.getLogger("kmsguard.server")

_HTTP_CODES = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED", 413: "REQUEST_TOO_LARGE"}
#: What the service says for each status it raises itself (never the exception's own text).
_HTTP_MESSAGES = {
    404: "no such endpoint",
    405: "this endpoint does not take that method",
    413: "the request is too large",
}


def error_json(status: int, code: str, message: str, retryable: bool = False, **headers: str) -> JSONResponse:
    return JSONResponse(
        {"error": {"code": code, "message": message, "retryable": retryable}},
        status_code=status,
        headers=headers or None,
    )


def kmsguard_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, KmsGuardError)
    headers: dict[str, str] = {}
    if isinstance(exc, RateLimited):
        headers["Retry-After"] = str(getattr(exc, "retry_after", 1))
    if isinstance(exc, Unauthenticated):
        headers["WWW-Authenticate"] = 'Bearer realm="kmsguard"'
    return error_json(exc.http_status, exc.code, exc.message, exc.retryable, **headers)


def validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    first = errors[0] if errors else {}
    return error_json(400, "INVALID_INPUT", describe(first))


def describe(error: dict[str, Any]) -> str:
    """One pydantic error as ``field: what is wrong``, naming the field by its path in the body."""
    loc = [p for p in error.get("loc", ()) if p != "body"]
    kind = str(error.get("type", ""))
    if kind == "json_invalid":
        return "body: not valid JSON"
    field = ""
    for part in loc:
        if isinstance(part, int):
            field += f"[{part}]"
        else:
            field += ("." if field else "") + str(part)
    what = {
        "missing": "is required",
        "extra_forbidden": "is not a known field",
        "string_type": "must be a string",
        "dict_type": "must be an object",
        "list_type": "must be an array",
        "model_attributes_type": "must be a JSON object",
        "too_long": "is too long",
    }.get(kind, "is invalid")
    return f"{field or 'body'}: {what}"


def http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    status = exc.status_code
    if status == 400:  # FastAPI could not parse the body at all (nesting too deep, not decodable)
        return error_json(400, "INVALID_INPUT", "body: not a JSON document the service can read")
    code = _HTTP_CODES.get(status, "INVALID_INPUT" if status < 500 else "INTERNAL_ERROR")
    return error_json(status, code, _HTTP_MESSAGES.get(status, "the request cannot be served"))


def unexpected(_: Request, exc: Exception) -> JSONResponse:
    # The type only: an exception's text may hold data from the request.
    log.error("unexpected %s while serving a request", type(exc).__name__)
    return error_json(500, "INTERNAL_ERROR", "the service failed; the request id names its audit records")


def install(app: FastAPI) -> None:
    app.add_exception_handler(KmsGuardError, kmsguard_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)
