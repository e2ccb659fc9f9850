"""Fixtures for the stored-data tests: the tests' own PostgreSQL, tables of envelopes, the CLI as processes."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import psycopg
import pytest

from audit.conftest import PG_DSN, pg_schema, postgres  # noqa: F401  (the run's one PostgreSQL server)
from kmsguard import Guard, envelope
from kmsguard.keyrings.local import KEY_FILE_NAME, LocalKeyring

ROOT = Path(__file__).resolve().parents[2]


def env_of(home: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KMSGUARD_")}
    env["KMSGUARD_HOME"] = str(home)
    env["PYTHONPATH"] = str(ROOT)
    return {**env, **(extra or {})}


def cli(
    home: Path, *args: str, extra: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """``kmsguard ARGS`` as its own process; progress as JSON lines (no terminal)."""
    return subprocess.run(
        [sys.executable, "-m", "kmsguard", *args],
        env=env_of(home, extra),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def start(home: Path, *args: str, extra: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "kmsguard", *args],
        env=env_of(home, extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )


@pytest.fixture
def local_home(home: Path, keyring: LocalKeyring) -> Path:
    """A home in use: its key file and its audit database exist before any worker starts."""
    Guard.from_env({"KMSGUARD_HOME": str(home)}).close()
    return home


@pytest.fixture
def pg(pg_schema: str) -> Iterator[psycopg.Connection]:  # noqa: F811
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{pg_schema}"')
        yield conn


def pg_url(schema: str, table: str = "bookings", column: str = "passport", **more: str) -> str:
    extra = "".join(f"&{k}={v}" for k, v in more.items())
    return f"{PG_DSN}?table={schema}.{table}&column={column}&key=id{extra}"


def fill(
    conn: psycopg.Connection,
    schema: str,
    values: Sequence[bytes | str | None],
    table: str = "bookings",
    binary: bool = False,
) -> None:
    """A table (id, passport) holding ``values`` at ids 1..n, loaded with COPY."""
    kind = "bytea" if binary else "text"
    conn.execute(f'CREATE TABLE "{schema}".{table} (id bigint PRIMARY KEY, passport {kind}, note text)')
    with conn.cursor().copy(f'COPY "{schema}".{table} (id, passport) FROM STDIN') as copy:
        for n, value in enumerate(values, 1):
            copy.write_row((n, value))


def sealed(home: Path, plaintexts: Sequence[str], classification: str = "pii") -> list[str]:
    """``kg1:`` tokens of ``plaintexts`` made with the cache on (the defaults): data keys are shared."""
    with Guard.from_env({"KMSGUARD_HOME": str(home)}) as guard:
        return [guard.encrypt_text(p, classification) for p in plaintexts]


def refs(token: str | bytes) -> tuple[str, ...]:
    return tuple(w.key_ref for w in envelope.parse(envelope.coerce(token)).wrapped_keys)


def wrapped_section(token: str | bytes) -> tuple[object, ...]:
    return envelope.parse(envelope.coerce(token)).wrapped_keys


def rotate(home: Path, classification: str = "pii") -> None:
    LocalKeyring(home / KEY_FILE_NAME).rotate(f"local:{classification}")
