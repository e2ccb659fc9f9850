"""One set of round-trip and error tests, run against Guard, AsyncGuard, RemoteGuard and AsyncRemoteGuard.

The remote clients must be drop-in replacements: the same results and the same
exception classes as Guard for the same calls.
"""

from __future__ import annotations

import asyncio
import datetime
import inspect
import time
from collections.abc import Callable, Iterator
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from kmsguard import (
    AccessDenied,
    ContextMismatch,
    ContextRequired,
    Guard,
    InvalidCiphertext,
    InvalidInput,
    KeyUnavailable,
    KmsGuardError,
    RateLimited,
    RequestTooLarge,
    Unauthenticated,
    UnknownClassification,
    envelope,
    errors,
)
from kmsguard.aio import AsyncGuard
from kmsguard.client import AsyncRemoteGuard, RemoteError, RemoteGuard, ServiceUnreachable
from kmsguard.keyrings.local import KEY_FILE_NAME, LocalKeyring
from kmsguard.testing.moto_server import free_port

from .conftest import Service


class Blocking:
    """An async guard's coroutines, run to completion one by one: the same calls as Guard's."""

    def __init__(self, target: Any) -> None:
        self._target = target
        self._runner = asyncio.Runner()

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._target, name)
        return lambda *a, **kw: self._runner.run(method(*a, **kw))

    def close(self) -> None:
        self._runner.run(self._target.close())
        self._runner.close()


REMOTES = ["RemoteGuard", "AsyncRemoteGuard"]


def connect(kind: str, url: str, token: str, **options: Any) -> Any:
    """A RemoteGuard, or an AsyncRemoteGuard called as one (Blocking); close() when done."""
    if kind == "RemoteGuard":
        return RemoteGuard(url, token, **options)
    return Blocking(AsyncRemoteGuard(url, token, **options))


@pytest.fixture(scope="module", params=["Guard", "AsyncGuard", *REMOTES])
def any_guard(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    kind = request.param
    if kind in REMOTES:
        service: Service = request.getfixturevalue("local_service")
        remote = connect(kind, service.url, service.tokens["app"])
        yield remote
        remote.close()
        return
    home = tmp_path_factory.mktemp("guard")
    LocalKeyring.create(home / KEY_FILE_NAME, ["general", "pii", "payment"])
    guard = Guard.from_env({"KMSGUARD_HOME": str(home), "KMSGUARD_AUDIT_DELIVERY": "thread"})
    if kind == "Guard":
        yield guard
    else:
        wrapped = Blocking(AsyncGuard(guard, owns=True))
        yield wrapped
        wrapped.close()
        return
    guard.close()


GUARD_METHODS = ["encrypt", "decrypt", "encrypt_text", "decrypt_text", "encrypt_many", "decrypt_many", "rewrap",
                 "inspect", "protect", "unprotect", "mask"]


@pytest.mark.parametrize("cls", [AsyncGuard, RemoteGuard, AsyncRemoteGuard])
def test_the_methods_take_guards_parameters(cls: type) -> None:
    """Code written against Guard calls the others unchanged: the same names, kinds and defaults
    (the async ones as coroutines)."""
    for name in GUARD_METHODS:
        ours, theirs = inspect.signature(getattr(Guard, name)), inspect.signature(getattr(cls, name))
        shape = [(p.name, p.kind, p.default) for p in ours.parameters.values()]
        assert [(p.name, p.kind, p.default) for p in theirs.parameters.values()] == shape, name
        assert inspect.iscoroutinefunction(getattr(cls, name)) == cls.__name__.startswith("Async"), name


def test_round_trips(any_guard: Any) -> None:
    data = bytes(range(256)) * 3
    sealed = any_guard.encrypt(data, "pii", {"user": "7"})
    assert isinstance(sealed, bytes) and sealed[:2] == b"KG"
    assert any_guard.decrypt(sealed, {"user": "7"}) == data
    assert any_guard.decrypt(envelope.to_text(sealed)) == data
    token = any_guard.encrypt_text("Grüße", "general")
    assert token.startswith("kg1:") and any_guard.decrypt_text(token) == "Grüße"
    assert any_guard.decrypt(any_guard.encrypt(b"", "general")) == b""
    paid = any_guard.encrypt_text("4111", "payment", {"purpose": "refund"})
    assert any_guard.decrypt_text(paid, {"purpose": "refund"}) == "4111"


def test_errors_are_guards_own(any_guard: Any) -> None:
    token = any_guard.encrypt_text("x", "pii", {"user": "7"})
    with pytest.raises(ContextMismatch):
        any_guard.decrypt_text(token, {"user": "8"})
    with pytest.raises(ContextRequired):
        any_guard.encrypt(b"4111", "payment")
    with pytest.raises(UnknownClassification):
        any_guard.encrypt(b"x", "secretive")
    raw = bytearray(envelope.coerce(token))
    raw[-1] ^= 1
    with pytest.raises(InvalidCiphertext) as caught:
        any_guard.decrypt(bytes(raw))
    assert str(caught.value) == "invalid ciphertext"
    with pytest.raises(InvalidCiphertext):
        any_guard.decrypt("kg1:AAAA")
    with pytest.raises(InvalidInput):
        any_guard.encrypt_text(b"bytes", "general")
    with pytest.raises(InvalidInput) as refused:  # a lone surrogate: a str that UTF-8 cannot encode
        any_guard.encrypt_text("card \ud800 4111", "general")
    assert "4111" not in str(refused.value)
    with pytest.raises(InvalidInput):
        any_guard.decrypt_text(any_guard.encrypt(b"\xff\xfe", "general"))


def test_batches(any_guard: Any) -> None:
    results = any_guard.encrypt_many([b"a", b"b", b"c"], "pii", contexts=[{"n": "1"}, None, {"n": "3"}])
    assert all(r.ok for r in results)
    sealed = [r.value for r in results]
    opened = any_guard.decrypt_many([sealed[0], b"garbage", sealed[2]])
    assert opened[0].value == b"a" and opened[2].value == b"c"
    assert isinstance(opened[1].error, InvalidCiphertext)
    failed = any_guard.encrypt_many([b"x", b"y"], "payment")
    assert all(isinstance(r.error, ContextRequired) for r in failed)
    with pytest.raises(InvalidInput):
        any_guard.encrypt_many([b"x"], "general", contexts=[None, None])


def test_rewrap_and_inspect(any_guard: Any) -> None:
    token = any_guard.encrypt_text("x", "general", {"k": "v"})
    rewrapped = any_guard.rewrap(token, {"k": "v"})
    assert isinstance(rewrapped, str) and any_guard.decrypt_text(rewrapped) == "x"
    binary = any_guard.rewrap(envelope.coerce(token))
    assert isinstance(binary, bytes) and any_guard.decrypt(binary) == b"x"
    info = any_guard.inspect(token)
    assert (info.classification, info.context, info.body_size, info.keys[0]["provider"]) == (
        "general", {"k": "v"}, 1, "local",
    )


# ---------------------------------------------------------------------- the clients' retries


def test_remote_guard_waits_out_429_within_its_deadline(limited_service: Service) -> None:
    url, token = limited_service.url, limited_service.tokens["app"]
    with RemoteGuard(url, token, deadline=0.3) as impatient, pytest.raises(RateLimited):
        for _ in range(4):
            impatient.encrypt(b"x", "general")
    time.sleep(2.1)  # the bucket refills
    with RemoteGuard(url, token, deadline=10) as patient:
        for _ in range(4):  # two over the burst: answered 429 with Retry-After, waited out
            assert patient.decrypt(patient.encrypt(b"x", "general")) == b"x"


def test_async_remote_guard_retries_too(limited_service: Service) -> None:
    async def run() -> None:
        async with AsyncRemoteGuard(limited_service.url, limited_service.tokens["admin"], deadline=10) as remote:
            for _ in range(4):
                assert await remote.decrypt(await remote.encrypt(b"x", "general")) == b"x"

    asyncio.run(run())


def test_unreachable_service_fails_at_the_deadline(tmp_path: Path) -> None:
    with RemoteGuard(f"http://127.0.0.1:{free_port()}", "kgk_x", deadline=0.5) as remote:
        started = time.monotonic()
        with pytest.raises(ServiceUnreachable):
            remote.encrypt(b"x", "general")
        assert time.monotonic() - started < 5


# ------------------------------------------- the clients' retries and errors, against a scripted service

TOKEN = "kgk_scripted-token-that-must-never-show"
Answer = Callable[[], httpx.Response]


def error(status: int, code: str, retry_after: str | None = None) -> Answer:
    """An answer of the service's error shape (``retryable`` as the service sets it: for 429 and 5xx)."""
    headers = {"Retry-After": retry_after} if retry_after is not None else {}
    body = {"error": {"code": code, "message": f"scripted {code}", "retryable": status == 429 or status >= 500}}
    return lambda: httpx.Response(status, json=body, headers=headers)


def bare(status: int) -> Answer:
    """An answer without a kmsguard body, as a load balancer in front of the service gives."""
    return lambda: httpx.Response(status, text="<html>Bad Gateway</html>")


def ok() -> httpx.Response:
    return httpx.Response(200, json={"plaintext": "hello"})


class Scripted:
    """A service answering each request with the next answer of its script (the last one
    again when the script runs out), counting the requests."""

    def __init__(self, *answers: Answer) -> None:
        self.answers = answers
        self.calls = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        assert request.headers["Authorization"] == f"Bearer {TOKEN}"
        self.calls += 1
        return self.answers[min(self.calls, len(self.answers)) - 1]()


def scripted(kind: str, script: Scripted, deadline: float = 10.0) -> Any:
    return connect(kind, "http://kmsguard.test", TOKEN, deadline=deadline, transport=httpx.MockTransport(script))


def timed(kind: str, script: Scripted, deadline: float = 10.0) -> tuple[Any, float]:
    """What ``decrypt_text`` returned (or the exception it raised) and the seconds it took."""
    remote = scripted(kind, script, deadline)
    started = time.monotonic()
    try:
        outcome: Any = remote.decrypt_text("kg1:AAAA")
    except KmsGuardError as exc:
        outcome = exc
    elapsed = time.monotonic() - started
    remote.close()
    return outcome, elapsed


def http_date(seconds_from_now: float) -> str:
    return format_datetime(datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=seconds_from_now),
                           usegmt=True)


@pytest.mark.parametrize("kind", REMOTES)
@pytest.mark.parametrize("first", [bare(502), error(503, "KEY_UNAVAILABLE"), error(502, "KMS_SERVICE_ERROR")],
                         ids=["502-gateway", "503", "502"])
def test_502_and_503_are_retried(kind: str, first: Answer) -> None:
    script = Scripted(first, ok)
    assert timed(kind, script)[0] == "hello"
    assert script.calls == 2


@pytest.mark.parametrize("kind", REMOTES)
def test_a_connection_failure_is_retried_and_never_shows_the_token(kind: str) -> None:
    def refused() -> httpx.Response:
        raise httpx.ConnectError(f"refused, Authorization: Bearer {TOKEN}")

    script = Scripted(refused, ok)
    assert timed(kind, script)[0] == "hello"
    assert script.calls == 2
    script = Scripted(refused)
    failure, _ = timed(kind, script, deadline=0.3)
    assert isinstance(failure, ServiceUnreachable) and script.calls >= 2
    assert failure.__cause__ is None and failure.__context__ is None  # the httpx error, holding the request, is gone
    assert TOKEN not in str(failure) and TOKEN not in repr(failure)


@pytest.mark.parametrize("kind", REMOTES)
@pytest.mark.parametrize("retry_after", ["0.5", "1"], ids=["seconds", "http-date"])
def test_429_waits_what_retry_after_says(kind: str, retry_after: str) -> None:
    """Seconds or an HTTP date (RFC 9110 allows both); a date has whole seconds, so "1" here
    is a date 2 s ahead, which asks for a wait of more than 1 s."""
    header = retry_after if retry_after == "0.5" else http_date(2)
    script = Scripted(error(429, "RATE_LIMITED", header), ok)
    outcome, elapsed = timed(kind, script)
    assert outcome == "hello" and script.calls == 2
    assert elapsed >= float(retry_after)


@pytest.mark.parametrize("kind", REMOTES)
@pytest.mark.parametrize("retry_after", ["30", "http-date"])
def test_a_retry_after_past_the_deadline_raises_at_once(kind: str, retry_after: str) -> None:
    header = retry_after if retry_after == "30" else http_date(60)
    script = Scripted(error(429, "RATE_LIMITED", header), ok)
    outcome, elapsed = timed(kind, script, deadline=5)
    assert isinstance(outcome, RateLimited) and script.calls == 1
    assert elapsed < 1  # no sleep that would end past the deadline


@pytest.mark.parametrize("kind", REMOTES)
@pytest.mark.parametrize(
    ("answer", "raised"),
    [(bare(503), ServiceUnreachable), (error(503, "KEY_UNAVAILABLE"), KeyUnavailable)],
    ids=["gateway", "service"],
)
def test_retries_end_at_the_deadline_with_the_last_answer(
    kind: str, answer: Answer, raised: type[KmsGuardError]
) -> None:
    script = Scripted(answer)
    outcome, elapsed = timed(kind, script, deadline=0.5)
    assert type(outcome) is raised
    assert script.calls >= 2 and elapsed < 1.5


SERVICE_ERRORS = [e for e in (getattr(errors, n) for n in errors.__all__) if e is not KmsGuardError]


@pytest.mark.parametrize("kind", REMOTES)
def test_every_error_code_raises_guards_class_without_retrying_past_the_deadline(kind: str) -> None:
    """Each code the service can answer (every kmsguard error answers its own ``http_status``)
    raises the class Guard raises, once: 4xx are not retried, and Retry-After 60 leaves no
    room for another try of a 429, 502 or 503 within the deadline."""
    for cls in SERVICE_ERRORS:
        script = Scripted(error(cls.http_status, cls.code, retry_after="60"), ok)
        raised, _ = timed(kind, script, deadline=5)
        assert type(raised) is cls and raised.code == cls.code, cls
        assert script.calls == 1, cls
        assert TOKEN not in str(raised) and TOKEN not in repr(raised)
    for status, code in [(404, "NOT_FOUND"), (405, "METHOD_NOT_ALLOWED"), (500, "INTERNAL_ERROR")]:
        script = Scripted(error(status, code), ok)
        raised, _ = timed(kind, script)
        assert isinstance(raised, RemoteError) and (raised.code, raised.http_status) == (code, status)
        assert script.calls == 1


@pytest.mark.parametrize("kind", REMOTES)
def test_the_services_refusals_are_guards_errors_without_the_token(kind: str, local_service: Service) -> None:
    """What only the service refuses (Guard has no API keys and no body limit), from a real server."""
    tokens = local_service.tokens
    general = connect(kind, local_service.url, tokens["general-only"])
    app = connect(kind, local_service.url, tokens["app"])
    try:
        pii = app.encrypt_text("x", "pii")
        raised: list[KmsGuardError] = []
        for call, expected in [
            (lambda: general.encrypt(b"x", "pii"), AccessDenied),
            (lambda: general.decrypt_text(pii), AccessDenied),
            (lambda: general.rewrap(pii), AccessDenied),
            (lambda: app.encrypt(b"x" * (2 << 20), "general"), RequestTooLarge),
        ]:
            with pytest.raises(expected) as caught:
                call()
            raised.append(caught.value)
        for name in ("revoked", None):
            token = tokens[name] if name else "kgk_" + "A" * 43
            stranger = connect(kind, local_service.url, token)
            with pytest.raises(Unauthenticated) as refused:
                stranger.encrypt(b"x", "general")
            stranger.close()
            raised.append(refused.value)
        secrets = list(tokens.values())
        for exc in raised:
            assert not any(t in str(exc) or t in repr(exc) for t in secrets), exc
    finally:
        general.close()
        app.close()


BOOKING = {
    "booking": "ABC123",
    "passengers": [{"name": "Jane Doe", "passport": "L898902C3", "age": 41}, {"name": "John Roe", "age": None}],
    "card": {"number": "4111111111111111", "expiry": [12, 2030]},
}
FIELDS = {"$.passengers[*].name": "pii", "$.passengers[*].age": "pii", "$.card": "payment"}
CONTEXT = {"booking": "ABC123", "purpose": "checkout"}


def test_protect_round_trips(any_guard: Any) -> None:
    sealed = any_guard.protect(BOOKING, FIELDS, CONTEXT)
    assert sealed["booking"] == "ABC123" and sealed["passengers"][0]["passport"] == "L898902C3"
    assert sealed["card"].startswith("kg1:") and sealed["passengers"][1]["age"].startswith("kg1:")
    assert any_guard.protect(sealed, FIELDS, CONTEXT) == sealed
    assert any_guard.unprotect(sealed, CONTEXT) == BOOKING
    only = any_guard.unprotect(sealed, CONTEXT, paths=["$.passengers[0].name"])
    assert only["passengers"][0]["name"] == "Jane Doe" and only["card"] == sealed["card"]
    detected = any_guard.protect({"pan": "4111 1111 1111 1111", "ref": "X"}, context=CONTEXT, detect=True)
    assert detected["pan"].startswith("kg1:") and detected["ref"] == "X"
    passports = "$.passengers[*].passport"
    masked = any_guard.mask(BOOKING, ["$.card.number", passports], {passports: "erase"})
    assert masked["card"]["number"] == "************1111" and masked["passengers"][0]["passport"] == "*****"


def test_protect_errors_are_guards_own(any_guard: Any) -> None:
    sealed = any_guard.protect(BOOKING, FIELDS, CONTEXT)
    moved = {**sealed, "card": sealed["passengers"][0]["name"]}
    with pytest.raises(ContextMismatch):
        any_guard.unprotect(moved, CONTEXT)
    with pytest.raises(ContextMismatch):
        any_guard.unprotect(sealed, {**CONTEXT, "booking": "XYZ999"})
    with pytest.raises(InvalidInput, match=r"\$\.nowhere"):
        any_guard.protect(BOOKING, {"$.nowhere": "pii"})
    assert any_guard.protect(BOOKING, {"$.nowhere": "pii"}, missing="ignore") == BOOKING
    with pytest.raises(ContextRequired):
        any_guard.protect(BOOKING, {"$.card": "payment"})
    with pytest.raises(UnknownClassification):
        any_guard.protect(BOOKING, {"$.booking": "secretive"})
    with pytest.raises(InvalidInput):
        any_guard.protect({"x": float("nan")}, {"$.x": "pii"})
    with pytest.raises(InvalidCiphertext):
        any_guard.unprotect({"x": "kg1:AAAA"})
    with pytest.raises(InvalidInput):
        any_guard.mask(BOOKING, ["$.booking"], {"$.booking": "shred"})
