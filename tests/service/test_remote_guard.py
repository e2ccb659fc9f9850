"""One set of round-trip and error tests, run against Guard, AsyncGuard, RemoteGuard and AsyncRemoteGuard.

The remote clients must be drop-in replacements: the same results and the same
exception classes as Guard for the same calls.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kmsguard import (
    ContextMismatch,
    ContextRequired,
    Guard,
    InvalidCiphertext,
    InvalidInput,
    RateLimited,
    UnknownClassification,
    envelope,
)
from kmsguard.aio import AsyncGuard
from kmsguard.client import AsyncRemoteGuard, RemoteGuard, ServiceUnreachable
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


@pytest.fixture(scope="module", params=["Guard", "AsyncGuard", "RemoteGuard", "AsyncRemoteGuard"])
def any_guard(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    kind = request.param
    if kind.endswith("RemoteGuard"):
        service: Service = request.getfixturevalue("local_service")
        if kind == "RemoteGuard":
            with RemoteGuard(service.url, service.tokens["app"]) as remote:
                yield remote
            return
        wrapped = Blocking(AsyncRemoteGuard(service.url, service.tokens["app"]))
        yield wrapped
        wrapped.close()
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
