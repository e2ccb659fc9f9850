"""Liveness, readiness and metrics: for orchestrators and scrapers, not for applications."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from kmsguard.server.auth import caller, service_of
from kmsguard.server.models import Health, error_responses

router = APIRouter()


@router.get("/healthz", response_model=Health, summary="Liveness: the process answers (no auth, no KMS call)")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    response_model=Health,
    responses={503: {"model": Health}},
    summary="Readiness: configuration, every classification's key, the audit spool (no auth)",
)
async def readyz(request: Request) -> JSONResponse:
    ready, checks = await service_of(request).readiness.check()
    body = {"status": "ready" if ready else "unready", "checks": checks}
    return JSONResponse(body, status_code=200 if ready else 503)


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}}, **error_responses(401, 403, 429)},
    summary="Prometheus metrics (an admin key unless [server] metrics_auth = false)",
)
async def metrics(request: Request) -> Response:
    service = service_of(request)
    if service.server.metrics_auth:
        (await caller(request)).require("admin")
    return Response(service.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")
