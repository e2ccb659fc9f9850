"""``GET /v1/selftest``: the self-test of this worker's deployment, for an admin key.

The same suite and JSON as ``kmsguard selftest --json`` (:mod:`kmsguard.selftest`),
answered 200 when no critical check failed, 503 otherwise. A run costs key-service
calls and audit records, so at most one runs at a time per worker, and its answer is
reused for :data:`REUSE_SECONDS`; callers arriving during a run wait for it. Each run's
failed checks are exported as ``kmsguard_selftest_failed_checks``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from kmsguard.selftest.runner import run_selftest
from kmsguard.server.auth import Authorized, service_of
from kmsguard.server.models import error_responses

#: Seconds an answer is served again before a new run.
REUSE_SECONDS = 30.0

router = APIRouter(prefix="/v1")


class _Latest:
    """The last answer and the lock that lets one run at a time (per worker process)."""

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.body: dict[str, Any] | None = None
        self.at = -1e9


@router.get(
    "/selftest",
    responses={
        200: {"description": "No critical check failed (the JSON of docs/selftest.md)"},
        503: {"description": "A critical check failed (same JSON)"},
        **error_responses(401, 403, 429),
    },
    summary="Run the self-test of this deployment (an admin key); reused for 30 s",
)
async def selftest(request: Request, who: Authorized) -> JSONResponse:
    who.require("admin")
    service = service_of(request)
    latest: _Latest | None = getattr(request.app.state, "selftest", None)
    if latest is None:
        latest = request.app.state.selftest = _Latest()
    async with latest.lock:
        if latest.body is None or time.monotonic() - latest.at >= REUSE_SECONDS:
            report = await asyncio.get_running_loop().run_in_executor(
                None, lambda: run_selftest(service.settings, serving=service.guard)
            )
            latest.body, latest.at = report.to_dict(), time.monotonic()
            failed = [r for r in report.results if r.status == "fail"]  # KmsguardSelftestFailing's metric
            service.telemetry.selftest_finished(sum(r.critical for r in failed), sum(not r.critical for r in failed))
        body = latest.body
    return JSONResponse(body, status_code=200 if body["ok"] else 503)
