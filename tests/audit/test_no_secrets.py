"""No audit record, spool byte, log line or metric carries plaintext or a data key."""

from __future__ import annotations

import base64
import logging
from collections.abc import Sequence
from pathlib import Path

import psycopg
import pytest

from kmsguard import Guard
from kmsguard.config import load_settings
from kmsguard.datakey import DataKey, WrappedKey
from kmsguard.errors import KmsGuardError
from kmsguard.keyrings.base import KeyRequest
from kmsguard.keyrings.local import LocalKeyring
from kmsguard.metrics import of
from kmsguard.stack import build_keyring, build_observers, build_telemetry

from .conftest import PG_DSN, write_config

PLAINTEXT = b"PAN-4111111111111111-SECRET"
CONTEXT_VALUE = "customer-8675309"


class CapturingKeyring:
    """The real keyring, remembering every data key it hands out."""

    def __init__(self, inner: LocalKeyring) -> None:
        self.inner = inner
        self.deks: list[bytes] = []

    def _seen(self, dk: DataKey) -> DataKey:
        self.deks.append(dk.plaintext)
        return dk

    def generate(self, request: KeyRequest) -> DataKey:
        return self._seen(self.inner.generate(request))

    def wrap(self, data_key: DataKey, request: KeyRequest) -> DataKey:
        return self._seen(self.inner.wrap(data_key, request))

    def unwrap(self, wrapped: Sequence[WrappedKey], request: KeyRequest) -> DataKey:
        return self._seen(self.inner.unwrap(wrapped, request))

    def rewrap(self, wrapped: Sequence[WrappedKey], request: KeyRequest) -> tuple[WrappedKey, ...]:
        return self.inner.rewrap(wrapped, request)


def forms(secret: bytes) -> list[bytes]:
    return [secret, secret.hex().encode(), base64.b64encode(secret), base64.urlsafe_b64encode(secret).rstrip(b"=")]


def _postgres_rows(schema: str) -> bytes:
    with psycopg.connect(PG_DSN) as conn:
        rows = conn.execute(f'SELECT t::text FROM "{schema}".audit_records t').fetchall()
    return "\n".join(r[0] for r in rows).encode()


@pytest.mark.parametrize("sink", ["sqlite", "jsonl", "postgres"])
def test_scan_finds_no_plaintext_or_data_key(
    sink: str, keyring: LocalKeyring, home: Path, caplog: pytest.LogCaptureFixture, request: pytest.FixtureRequest
) -> None:
    caplog.set_level(logging.DEBUG)
    audit: dict[str, object] = {"sink": sink, "delivery": "thread"}  # in-process, so caplog sees every log line
    if sink == "postgres":
        audit.update(dsn=PG_DSN, schema=request.getfixturevalue("pg_schema"))
    write_config(home, audit, extra='[metrics]\nemf = "metrics.emf"\nflush_interval = 0.05\n')
    settings = load_settings({"KMSGUARD_HOME": str(home)})
    telemetry = build_telemetry(settings)
    capturing = CapturingKeyring(build_keyring(settings, telemetry))  # type: ignore[arg-type]
    guard = Guard(
        settings.policy,
        capturing,
        observers=build_observers(settings, capturing, telemetry),
        principal="svc",
        settings=settings,
    )
    with guard:
        for cls, ctx in [
            ("general", {"customer": CONTEXT_VALUE}),
            ("pii", {"customer": CONTEXT_VALUE}),
            ("payment", {"purpose": "refund", "customer": CONTEXT_VALUE}),
        ]:
            sealed = guard.encrypt(PLAINTEXT, cls, ctx)
            assert guard.decrypt(sealed, ctx) == PLAINTEXT
            guard.rewrap(sealed, ctx)
        failures = [
            lambda: guard.encrypt(PLAINTEXT, PLAINTEXT.decode()),  # plaintext passed as a classification
            lambda: guard.decrypt(sealed, {"customer": "someone-else", "purpose": "refund"}),
            lambda: guard.decrypt(sealed[:-3] + b"xyz", {"purpose": "refund"}),
        ]
        for fail in failures:
            with pytest.raises(KmsGuardError) as err:
                fail()
            assert PLAINTEXT.decode() not in str(err.value)
        exposition = of(guard.observers).exposition()  # type: ignore[union-attr]
    assert capturing.deks
    secrets = [f for s in [PLAINTEXT, *capturing.deks] for f in forms(s)]
    stored = {p: p.read_bytes() for p in home.rglob("*") if p.is_file()}
    assert any(b"OperationDuration" in data for data in stored.values())  # EMF lines were written
    assert any(b"refund" not in data and b"decrypt" in data for data in stored.values())  # records were written
    haystacks = {**{str(p): d for p, d in stored.items()}, "metrics": exposition, "log": caplog.text.encode()}
    if sink == "postgres":
        haystacks["postgres rows"] = _postgres_rows(str(audit["schema"]))
        assert b"decrypt" in haystacks["postgres rows"]
    for where, data in haystacks.items():
        for secret in secrets:
            assert secret not in data, f"secret bytes found in {where}"
        if "keyring.json" not in where:
            assert CONTEXT_VALUE.encode() not in data, f"a context value in clear in {where}"
