"""Fixtures for the audit tests: homes with a chosen sink, a real PostgreSQL schema, worker processes.

The PostgreSQL server is $KMSGUARD_TEST_PG_DSN when set, else one the run starts for itself on first use
(:mod:`.pgserver`) and removes at the end. Without either, every PostgreSQL test fails saying what to install.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from kmsguard.audit import AuditSettings, keys_for, open_sink
from kmsguard.audit.verify import Heads, Report, verify
from kmsguard.config import load_settings
from kmsguard.keyrings.local import LocalKeyring
from kmsguard.stack import build_keyring

from .pgserver import PostgresUnavailable, ThrowawayPostgres

#: None when $KMSGUARD_TEST_PG_DSN names the server; else this run's own, started by the first test that needs it.
PG_SERVER = None if os.environ.get("KMSGUARD_TEST_PG_DSN") else ThrowawayPostgres()
PG_DSN = PG_SERVER.dsn if PG_SERVER else os.environ["KMSGUARD_TEST_PG_DSN"]
ROOT = Path(__file__).resolve().parents[2]


def write_config(home: Path, audit: dict[str, object], extra: str = "") -> None:
    lines = ["[audit]"] + [f"{k} = {_toml(v)}" for k, v in audit.items()]
    (home / "kmsguard.toml").write_text("\n".join(lines) + "\n" + extra)


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return str(value)


@pytest.fixture(scope="session")
def postgres() -> Iterator[str]:
    """The PostgreSQL server's DSN, the server started first if it is the run's own. No server: the test fails."""
    problem = None
    try:
        if PG_SERVER is not None:
            PG_SERVER.start()
        else:
            psycopg.connect(PG_DSN, connect_timeout=5).close()
    except PostgresUnavailable as e:
        problem = str(e)
    except psycopg.OperationalError as e:
        problem = (
            f"KMSGUARD_TEST_PG_DSN={PG_DSN} is not reachable ({e}); "
            "unset it to let the tests start a PostgreSQL server of their own"
        )
    if problem:
        pytest.fail(problem, pytrace=False)
    try:
        yield PG_DSN
    finally:
        if PG_SERVER is not None:
            PG_SERVER.stop()


@pytest.fixture
def pg_schema(postgres: str) -> Iterator[str]:
    """A fresh schema on the real server, dropped afterwards. No server: the test fails."""
    schema = f"kg_audit_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    yield schema
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture
def pg_home(home: Path, keyring: LocalKeyring, pg_schema: str) -> Path:
    home.mkdir(parents=True, exist_ok=True)
    write_config(home, {"sink": "postgres", "dsn": PG_DSN, "schema": pg_schema, "flush_interval": 0.05})
    return home


def env_of(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KMSGUARD_")}
    env["KMSGUARD_HOME"] = str(home)
    env["PYTHONPATH"] = str(ROOT)
    return env


def start_worker(home: Path, count: int, mode: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.audit.worker", str(count), mode],
        cwd=ROOT,
        env=env_of(home),
        stdout=subprocess.PIPE,
        text=True,
    )


def verify_home(home: Path, env: dict[str, str] | None = None, anchor: Heads | None = None) -> Report:
    settings = load_settings({**(env or {}), "KMSGUARD_HOME": str(home)})
    sink = open_sink(AuditSettings.of(settings))
    try:
        return verify(sink.records(), keys_for(settings, build_keyring(settings), sink), anchor)
    finally:
        sink.close()


def records_of(home: Path) -> list:  # type: ignore[type-arg]
    settings = load_settings({"KMSGUARD_HOME": str(home)})
    sink = open_sink(AuditSettings.of(settings))
    try:
        return list(sink.records())
    finally:
        sink.close()
