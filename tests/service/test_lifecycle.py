"""The service's life: readiness follows the key service; SIGTERM loses no answer and no audit record."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Iterator

import httpx
import pytest

from kmsguard.testing.moto_server import MotoServer
from kmsguard.testing.region import KmsRegion

from .conftest import start_aws, start_local

FAST_AWS = "[aws]\nconnect_timeout = 1\nread_timeout = 2\noperation_timeout = 3\nmax_attempts = 1"


@pytest.fixture
def own_region(kms_server: MotoServer) -> Iterator[KmsRegion]:
    region = KmsRegion.start("us-east-1", kms_server)
    yield region
    region.close()


def _ready(url: str) -> httpx.Response:
    return httpx.get(url + "/readyz", timeout=30)


def _until(url: str, status: int, within: float) -> httpx.Response:
    deadline = time.monotonic() + within
    while True:
        r = _ready(url)
        if r.status_code == status or time.monotonic() > deadline:
            return r
        time.sleep(0.2)


def test_readiness_follows_the_key_service(tmp_path_factory: pytest.TempPathFactory, own_region: KmsRegion) -> None:
    service = start_aws(tmp_path_factory.mktemp("svc-ready"), own_region, "ready_interval = 0.5", FAST_AWS)
    try:
        assert _ready(service.url).status_code == 200
        own_region.proxy.outage("refuse")
        down = _until(service.url, 503, 30)
        assert down.status_code == 503, down.text
        body = down.json()
        assert body["status"] == "unready"
        assert body["checks"]["config"] == "ok" and body["checks"]["audit"] == "ok"
        assert all(body["checks"][f"key:{c}"] != "ok" for c in ("general", "pii", "payment"))
        assert httpx.get(service.url + "/healthz").status_code == 200  # alive all the same
        own_region.proxy.restore()
        up = _until(service.url, 200, 30)
        assert up.status_code == 200, up.text
    finally:
        service.process.stop()


def test_sigterm_finishes_in_flight_requests_and_audits_every_2xx(tmp_path_factory: pytest.TempPathFactory) -> None:
    service = start_local(tmp_path_factory.mktemp("svc-term"))
    answered: list[int] = []
    malformed: list[str] = []

    async def client(http: httpx.AsyncClient, n: int) -> None:
        body = {"classification": "pii", "context": {"client": str(n)}, "plaintext": "x" * 512}
        while True:
            try:
                r = await http.post("/v1/encrypt", json=body)
            except httpx.TransportError:
                return  # the server has closed: no answer, so nothing to check
            try:
                doc = json.loads(r.content)
                assert ("token" in doc) if r.status_code == 200 else ("error" in doc)
            except (ValueError, AssertionError):
                malformed.append(f"{r.status_code} {r.content[:100]!r}")
            answered.append(r.status_code)

    async def run() -> None:
        headers = {"Authorization": f"Bearer {service.tokens['app']}"}
        limits = httpx.Limits(max_connections=50)
        async with httpx.AsyncClient(base_url=service.url, headers=headers, limits=limits, timeout=30) as http:
            tasks = [asyncio.create_task(client(http, n)) for n in range(50)]
            while len(answered) < 300:
                await asyncio.sleep(0.05)
            service.process.terminate()
            await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)

    try:
        asyncio.run(run())
        # uvicorn ends by re-raising the signal it handled, so the exit status is -SIGTERM.
        assert service.process.wait(timeout=60) in (0, -signal.SIGTERM)
    finally:
        log = service.process.log()
        service.process.stop()
    assert "Application shutdown complete" in log
    assert not malformed, malformed[:5]
    ok = answered.count(200)
    assert ok >= 300 and set(answered) <= {200, 503}, (set(answered), log[-2000:])
    records = [r for r in service.audit_records() if r.operation == "encrypt" and r.principal == "app"]
    assert sum(1 for r in records if r.outcome == "ok") == ok
