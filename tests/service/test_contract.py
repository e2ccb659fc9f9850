"""The served OpenAPI document, fuzzed: every operation, generated bodies, a valid admin token.

No answer may be a 5xx, and every answer must conform to the document (status, content
type, schema). Then the inputs no generator makes on its own: malformed JSON, wrong
content types, huge and deeply nested bodies, on every POST operation.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from .conftest import Service

# FastAPI serves OpenAPI 3.1, which schemathesis 3.x supports behind this switch.
schemathesis.experimental.OPEN_API_3_1.enable()

CHECKS = (not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance)


@pytest.fixture(scope="module")
def openapi(local_service: Service) -> Any:
    return schemathesis.from_uri(local_service.url + "/openapi.json", base_url=local_service.url)


schema = schemathesis.from_pytest_fixture("openapi")
#: Generated cases the fuzz must send in all (the issue's floor).
MIN_CASES = 500


@pytest.fixture(scope="module")
def sent() -> Iterator[list[str]]:
    """The operations of the cases sent; once the module is done, there must be MIN_CASES of them
    (none at all, say when the document yields no operation, fails too)."""
    cases: list[str] = []
    yield cases
    print(f"\nschemathesis sent {len(cases)} cases: {dict(Counter(cases))}")
    assert len(cases) >= MIN_CASES, f"only {len(cases)} generated cases were sent"


@schema.parametrize()
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_every_operation_conforms(case: Any, local_service: Service, sent: list[str]) -> None:
    response = case.call(headers={"Authorization": f"Bearer {local_service.tokens['admin']}"}, timeout=30)
    sent.append(case.operation.verbose_name)
    case.validate_response(response, checks=CHECKS)


def _post_paths(service: Service) -> list[str]:
    doc = httpx.get(service.url + "/openapi.json").json()
    return [path for path, ops in doc["paths"].items() if "post" in ops]


def test_the_document_covers_the_api(local_service: Service) -> None:
    doc = httpx.get(local_service.url + "/openapi.json").json()
    assert set(doc["paths"]) >= {
        "/v1/encrypt", "/v1/decrypt", "/v1/encrypt/batch", "/v1/decrypt/batch", "/v1/rewrap", "/v1/inspect",
        "/v1/protect", "/v1/unprotect", "/v1/mask", "/v1/scan",
        "/healthz", "/readyz", "/metrics",
    }
    assert "422" not in str(doc) or all("422" not in op.get("responses", {}) for p in doc["paths"].values()
                                        for op in p.values())
    assert httpx.get(local_service.url + "/docs").status_code == 200


BAD_BODIES = {
    "malformed": (b'{"token": "kg1:', "application/json"),
    "not an object": (b'"just a string"', "application/json"),
    "wrong content type": (b"<token>kg1:x</token>", "application/xml"),
    "form": (b"token=kg1%3Ax", "application/x-www-form-urlencoded"),
    "empty": (b"", "application/json"),
    "binary": (bytes(range(256)) * 4, "application/octet-stream"),
    "deeply nested": (b'{"items": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "application/json"),
    "nested objects": (b'{"context": ' + b'{"a": ' * 20_000 + b"1" + b"}" * 20_000 + b"}", "application/json"),
    "huge": (b'{"token": "' + b"A" * (3 << 20) + b'"}', "application/json"),
    "huge batch": (b'{"items": [' + b",".join([b'{"token": "kg1:AAAA"}'] * 20_000) + b"]}", "application/json"),
}


@pytest.mark.parametrize("kind", list(BAD_BODIES))
def test_bad_bodies_are_4xx_json_on_every_operation(local_service: Service, kind: str) -> None:
    content, content_type = BAD_BODIES[kind]
    headers = {"Authorization": f"Bearer {local_service.tokens['admin']}", "Content-Type": content_type}
    with httpx.Client(base_url=local_service.url, timeout=60) as c:
        for path in _post_paths(local_service):
            r = c.post(path, content=content, headers=headers)
            if path == "/v1/echo" and r.status_code == 200:
                continue  # the echo endpoint accepts any well-formed body of its shape
            assert 400 <= r.status_code < 500, (path, r.status_code, r.text[:200])
            error = r.json()["error"]
            assert set(error) == {"code", "message", "retryable"}
            assert "Traceback" not in r.text and len(r.text) < 1000
