"""The JSON bodies of API v1 (pydantic models; they are also the OpenAPI schema).

Strict: no field is coerced from another type, and an unknown field is an error, so a
client's typo (``plantext``) is a 400 naming it rather than an empty encryption.
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, StrictBool, StrictStr, ValidationError
from pydantic import Field as PydanticField

Context = dict[StrictStr, StrictStr] | None


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ErrorDetail(BaseModel):
    code: str
    message: str
    retryable: bool


class ErrorBody(BaseModel):
    error: ErrorDetail


class EncryptRequest(_Body):
    """Exactly one of ``plaintext`` (UTF-8 text) and ``plaintext_b64`` (standard base64 of any bytes)."""

    classification: StrictStr
    context: Context = None
    plaintext: StrictStr | None = None
    plaintext_b64: StrictStr | None = None


class TokenRequest(_Body):
    """A ``kg1:`` token and the context to check against it (decrypt, rewrap)."""

    token: StrictStr
    context: Context = None


class InspectRequest(_Body):
    token: StrictStr


class TokenResponse(BaseModel):
    token: str


class PlaintextResponse(BaseModel):
    """``plaintext`` when the data is UTF-8 text, else ``plaintext_b64``."""

    plaintext: str | None = None
    plaintext_b64: str | None = None


class EncryptBatchRequest(_Body):
    items: list[EncryptRequest]


class DecryptBatchRequest(_Body):
    items: list[TokenRequest]


class BatchItem(BaseModel):
    """One item's outcome: a value (``token``, or ``plaintext``/``plaintext_b64``) or an ``error``."""

    token: str | None = None
    plaintext: str | None = None
    plaintext_b64: str | None = None
    error: ErrorDetail | None = None


class BatchResponse(BaseModel):
    results: list[BatchItem]


class KeyInfo(BaseModel):
    provider: str
    key_ref: str


class InspectResponse(BaseModel):
    version: int
    suite: int
    classification: str
    context: dict[str, str]
    keys: list[KeyInfo]
    size: int
    body_size: int
    #: Suite 2 (a stream) only: plaintext bytes per segment, and how many segments.
    segment_size: int | None = None
    segments: int | None = None


class Health(BaseModel):
    status: str
    checks: dict[str, str] = {}


Body = TypeVar("Body", bound=BaseModel)


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` that documents ``model`` as the JSON body of a route reading it with :func:`parse`."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    schema.pop("$defs", None)  # the models it refers to are documented by the single-item routes
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


async def parse(request: Request, model: type[Body]) -> Body:
    """The request's body as ``model``, parsed and validated from the bytes in one pass.

    For the batch routes, whose bodies are large: FastAPI decodes JSON into Python objects
    and then validates those, which costs about twice pydantic's own parser. The answers
    are FastAPI's: a body that is not ``application/json`` (or ``+json``), missing or
    not valid JSON, or not of the model, raises RequestValidationError.
    """
    raw = await request.body()
    if not raw:
        raise RequestValidationError([{"type": "missing", "loc": ("body",)}])
    kind, _, subtype = request.headers.get("content-type", "").partition(";")[0].strip().lower().partition("/")
    if kind != "application" or not (subtype == "json" or subtype.endswith("+json")):
        raise RequestValidationError([{"type": "model_attributes_type", "loc": ("body",)}])
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_context=False, include_input=False)
        raise RequestValidationError(errors) from None


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the error statuses an endpoint can answer."""
    return {s: {"model": ErrorBody} for s in statuses}


# ---------------------------------------------------------------------- field-level protection (kmsguard.fields)


class FieldRule(_Body):
    """A field protected under ``class``, optionally with a blind index written beside it."""

    classification: StrictStr = PydanticField(alias="class")
    index: StrictStr | None = None
    normalize: StrictStr | list[StrictStr] | None = None


class ProtectRequest(_Body):
    """``record`` with the values at ``fields`` (JSONPath -> classification or rule) replaced by tokens."""

    record: Any
    fields: dict[StrictStr, StrictStr | FieldRule] | None = None
    context: Context = None
    missing: Literal["error", "ignore"] = "error"
    detect: StrictBool = False
    keep: list[StrictStr] = []


class UnprotectRequest(_Body):
    """``record`` with the tokens ``protect`` made (all, or those at ``paths``) restored."""

    record: Any
    context: Context = None
    paths: list[StrictStr] | None = None


class MaskRequest(_Body):
    """``record`` with the values at ``fields`` masked: by ``rules`` (path -> erase, last4 or email),
    else by the kind of value detected."""

    record: Any
    fields: list[StrictStr]
    rules: dict[StrictStr, StrictStr] | None = None


class ScanRequest(_Body):
    """Exactly one of ``text`` (located by ``line:column``) and ``record`` (by JSON path)."""

    text: StrictStr | None = None
    record: Any = None


class RecordResponse(BaseModel):
    record: Any


class FindingResponse(BaseModel):
    """A sensitive value found: never the value, only its kind, place and a masked preview."""

    kind: str
    classification: str | None
    location: str
    preview: str


class ScanResponse(BaseModel):
    """The first 10,000 findings, in order, and ``count``: how many there were in all."""

    findings: list[FindingResponse]
    count: int
