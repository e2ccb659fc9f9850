"""API v1: field-level protection of JSON records (kmsguard.fields) and sensitive-data scans.

``protect`` needs ``encrypt`` on every classification it would encrypt under, and
``unprotect`` ``decrypt`` on the classification of every token it would open; both are
worked out before any key is used (fields.classifications, fields.token_classifications),
so a refused request encrypts or decrypts nothing. ``mask`` and ``scan`` use no key and
need ``inspect`` (on any classification). Records are bounded: at most MAX_PATHS paths a
request, nested at most MAX_DEPTH deep, numbers finite; a bad one is INVALID_INPUT naming
where, never quoting a value. Protect and unprotect run on the worker's AsyncGuard (their
key work in its pool); selecting, masking and scanning, CPU work that grows with the record
(a ``$..`` path walks all of it), run in a thread, so the event loop keeps serving others.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from typing import Any

from fastapi import APIRouter, Request

from kmsguard import fields
from kmsguard.detect import detect_json, detect_text
from kmsguard.errors import InvalidInput, RequestTooLarge
from kmsguard.jsonpaths import format_path
from kmsguard.server.auth import Authorized, service_of
from kmsguard.server.models import (
    MaskRequest,
    ProtectRequest,
    RecordResponse,
    ScanRequest,
    ScanResponse,
    UnprotectRequest,
    error_responses,
)

#: Paths (``fields``, ``keep``, ``paths``) one request may name.
MAX_PATHS = 256
#: How long a path may be (jsonpath-ng walks a parsed path recursively).
MAX_PATH_CHARS = 512
#: Findings one scan answers (``count`` says how many there were).
MAX_FINDINGS = 10_000
#: How deep a record may nest: deeper is refused before anything walks it.
MAX_DEPTH = 64

router = APIRouter(prefix="/v1", responses=error_responses(400, 401, 403, 404, 413, 429, 500, 502, 503, 504))


@router.post("/protect", response_model=RecordResponse, summary="Encrypt selected (or detected) fields of a record")
async def protect(body: ProtectRequest, request: Request, who: Authorized) -> dict[str, Any]:
    who.require("encrypt")
    _check_paths("fields", list(body.fields or ()))
    _check_paths("keep", body.keep)
    _check_record(body.record)
    specs = {
        path: spec if isinstance(spec, str) else spec.model_dump(by_alias=True, exclude_none=True)
        for path, spec in (body.fields or {}).items()
    }
    used = await asyncio.to_thread(
        fields.classifications, body.record, specs, missing=body.missing, detect=body.detect, keep=body.keep
    )
    for classification in sorted(used):
        who.require("encrypt", classification)
    with who.acting():
        record = await service_of(request).aguard.protect(
            body.record, specs, body.context, missing=body.missing, detect=body.detect, keep=body.keep
        )
    return {"record": record}


@router.post("/unprotect", response_model=RecordResponse, summary="Decrypt the protected fields of a record")
async def unprotect(body: UnprotectRequest, request: Request, who: Authorized) -> dict[str, Any]:
    who.require("decrypt")
    if body.paths is not None:
        _check_paths("paths", body.paths)
    _check_record(body.record)
    for classification in sorted(await asyncio.to_thread(fields.token_classifications, body.record, body.paths)):
        who.require("decrypt", classification)
    with who.acting():
        record = await service_of(request).aguard.unprotect(body.record, body.context, paths=body.paths)
    return {"record": record}


@router.post("/mask", response_model=RecordResponse, summary="Irreversibly mask selected fields (no key is used)")
async def mask(body: MaskRequest, who: Authorized) -> dict[str, Any]:
    who.require("inspect")
    _check_paths("fields", body.fields)
    _check_record(body.record)
    return {"record": await asyncio.to_thread(fields.mask, body.record, body.fields, body.rules)}


@router.post("/scan", response_model=ScanResponse, summary="Find sensitive values (findings only, never values)")
async def scan(body: ScanRequest, who: Authorized) -> dict[str, Any]:
    who.require("inspect")
    given = {"text", "record"} & body.model_fields_set
    if len(given) != 1:
        raise InvalidInput("body: give exactly one of text and record")
    if body.text is not None:
        found = await asyncio.to_thread(detect_text, body.text)
    else:
        _check_record(body.record)
        found = await asyncio.to_thread(detect_json, body.record)
    return {"findings": [f.to_dict() for f in found[:MAX_FINDINGS]], "count": len(found)}


def _check_paths(name: str, paths: Sequence[str]) -> None:
    """At most MAX_PATHS paths of at most MAX_PATH_CHARS; no regular-expression filter (``=~``),
    whose pattern, chosen by the caller, could hold a worker for as long as it likes."""
    if len(paths) > MAX_PATHS:
        raise RequestTooLarge(f"{name}: at most {MAX_PATHS} paths a request")
    for i, path in enumerate(paths):
        if len(path) > MAX_PATH_CHARS:
            raise InvalidInput(f"{name}[{i}]: a path is at most {MAX_PATH_CHARS} characters")
        if "=~" in path:
            raise InvalidInput(f"{name}[{i}]: regular-expression filters (=~) are not served")


def _check_record(record: Any) -> None:
    """INVALID_INPUT naming the place of a record nested deeper than MAX_DEPTH or holding a
    number JSON cannot carry back (NaN, Infinity): walked without recursion."""
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(record, ())]
    while stack:
        value, here = stack.pop()
        if isinstance(value, dict | list):
            if len(here) >= MAX_DEPTH:
                raise InvalidInput(f"record: nested deeper than {MAX_DEPTH} levels at {format_path(here[:8])}...")
            items = value.items() if isinstance(value, dict) else enumerate(value)
            stack.extend((item, (*here, key)) for key, item in items)
        elif isinstance(value, float) and not math.isfinite(value):
            raise InvalidInput(f"record: the number at {format_path(here)} is not finite")
