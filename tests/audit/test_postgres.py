"""The PostgreSQL sink against the real server: many writers, tampering, outages, crashes.

The server is $KMSGUARD_TEST_PG_DSN, or one the run starts for itself (see conftest.py). Without one these
tests fail: they are what proves the shared sink.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

from kmsguard import Guard
from kmsguard.audit import AuditObserver

from .conftest import PG_DSN, records_of, start_worker, verify_home, write_config
from .tcpproxy import TcpProxy


def observer_of(guard: Guard) -> AuditObserver:
    return next(o for o in guard.observers if isinstance(o, AuditObserver))


def pg(schema: str, statement: str, *params: object) -> list[tuple]:  # type: ignore[type-arg]
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        cur = conn.execute(statement.replace("T.", f'"{schema}".'), params)
        return cur.fetchall() if cur.description else []


def test_four_writer_processes_then_verify(pg_home: Path, pg_schema: str) -> None:
    workers = [start_worker(pg_home, 60, "close") for _ in range(4)]
    for w in workers:
        w.communicate(timeout=120)  # read to its end and closed: the pipe never fills, nor leaks
        assert w.returncode == 0
    records = records_of(pg_home)
    writers = {r.writer_id for r in records}
    assert len(writers) == 4 and len(records) == 4 * 61
    for writer in writers:
        assert [r.seq for r in records if r.writer_id == writer] == list(range(1, 62))
    report = verify_home(pg_home)
    assert report.intact and report.writers == 4 and report.open_writers == []
    payment = [r for r in records if r.classification == "payment"]
    assert len(payment) == 4 * 12 and all(r.outcome == "ok" for r in payment)


@pytest.fixture
def filled(pg_home: Path, pg_schema: str) -> Path:
    with Guard.from_env({"KMSGUARD_HOME": str(pg_home)}) as guard:
        for i in range(8):
            guard.encrypt(b"x", "general", {"i": str(i)})
    assert verify_home(pg_home).intact
    return pg_home


def test_a_deleted_row_is_detected(filled: Path, pg_schema: str) -> None:
    pg(pg_schema, "DELETE FROM T.audit_records WHERE seq = 4")
    [problem] = verify_home(filled).problems
    assert (problem.seq, problem.kind) == (5, "removed")


def test_an_edited_row_is_detected(filled: Path, pg_schema: str) -> None:
    pg(pg_schema, "UPDATE T.audit_records SET principal = 'someone-else' WHERE seq = 6")
    [problem] = verify_home(filled).problems
    assert (problem.seq, problem.kind) == (6, "altered")


def test_reordered_rows_are_detected(filled: Path, pg_schema: str) -> None:
    # Swap the sequence numbers of records 2 and 3.
    pg(pg_schema, "UPDATE T.audit_records SET seq = -1 WHERE seq = 2")
    pg(pg_schema, "UPDATE T.audit_records SET seq = 2 WHERE seq = 3")
    pg(pg_schema, "UPDATE T.audit_records SET seq = 3 WHERE seq = -1")
    [problem] = verify_home(filled).problems
    assert (problem.seq, problem.kind) == (2, "moved")


def test_a_deleted_writer_is_detected_against_an_anchor(filled: Path, pg_schema: str) -> None:
    heads = verify_home(filled).heads
    [(writer, (last, _hash))] = heads.items()
    pg(pg_schema, "DELETE FROM T.audit_records")
    assert verify_home(filled).intact  # nothing left to contradict itself
    [problem] = verify_home(filled, anchor=heads).problems
    assert (problem.writer_id, problem.seq, problem.kind) == (writer, last, "removed")


def _run_through_outage(guard: Guard, cut: object, restore: object, before: int, during: int, after: int) -> None:
    obs = observer_of(guard)
    for i in range(before):
        guard.encrypt(b"x", "general", {"i": str(i)})
    assert obs.flush(timeout=30)
    cut()  # type: ignore[operator]
    for i in range(during):
        guard.encrypt(b"x", "general" if i % 2 else "payment", {"i": str(i), "purpose": "p"})
    deadline = time.monotonic() + 10
    while obs.failures == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert obs.failures > 0  # the deliverer saw the outage and kept the records spooled
    restore()  # type: ignore[operator]
    for i in range(after):
        guard.encrypt(b"x", "general", {"i": str(i)})
    assert obs.flush(timeout=60)


def test_outage_by_killed_connections_loses_nothing_and_duplicates_nothing(pg_home: Path, pg_schema: str) -> None:
    """The server kills the deliverer's connections for a while (an admin, a failover), then stops."""
    stop = threading.Event()
    killing = threading.Event()

    def terminator() -> None:
        with psycopg.connect(PG_DSN, autocommit=True) as conn:
            while not stop.is_set():
                if killing.is_set():
                    conn.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
                        (f"kmsguard audit {pg_schema}"[:63],),
                    )
                time.sleep(0.002)

    thread = threading.Thread(target=terminator, daemon=True)
    thread.start()
    try:
        with Guard.from_env({"KMSGUARD_HOME": str(pg_home)}) as guard:
            _run_through_outage(guard, killing.set, killing.clear, 20, 30, 20)
    finally:
        stop.set()
        thread.join()
    records = records_of(pg_home)
    assert [r.seq for r in records] == list(range(1, 72))  # 70 operations + writer-closed, once each, in order
    assert verify_home(pg_home).intact


def test_outage_of_the_database_port_then_recovery(home: Path, keyring: object, pg_schema: str) -> None:
    upstream = urlsplit(PG_DSN)
    proxy = TcpProxy((upstream.hostname or "127.0.0.1", upstream.port or 5432))
    proxy.start()
    dsn = urlunsplit(upstream._replace(netloc=f"{upstream.username}@127.0.0.1:{proxy.port}"))
    write_config(
        home, {"sink": "postgres", "dsn": dsn, "schema": pg_schema, "flush_interval": 0.05, "connect_timeout": 1}
    )
    try:
        with Guard.from_env({"KMSGUARD_HOME": str(home)}) as guard:
            _run_through_outage(guard, proxy.stop, proxy.start, 15, 40, 15)
    finally:
        proxy.stop()
    direct = home.parent / "direct"
    direct.mkdir()
    (direct / "keyring.json").write_bytes((home / "keyring.json").read_bytes())
    (direct / "keyring.json").chmod(0o600)
    write_config(direct, {"sink": "postgres", "dsn": PG_DSN, "schema": pg_schema})
    records = records_of(direct)
    assert [r.seq for r in records] == list(range(1, 72))
    assert verify_home(direct).intact


def test_kill_9_of_a_writer_loses_nothing(pg_home: Path, pg_schema: str) -> None:
    write_config(pg_home, {"sink": "postgres", "dsn": PG_DSN, "schema": pg_schema, "flush_interval": 30})
    worker = start_worker(pg_home, 50, "hang")
    assert worker.stdout is not None and worker.stdout.readline().strip() == "returned 50"
    os.kill(worker.pid, signal.SIGKILL)
    worker.communicate()  # reaped, and its pipe closed
    with Guard.from_env({"KMSGUARD_HOME": str(pg_home)}) as guard:
        guard.encrypt(b"x", "general")
        assert observer_of(guard).flush(timeout=30)
        survivor = observer_of(guard).writer_id
    records = [r for r in records_of(pg_home) if r.writer_id != survivor]
    assert [r.seq for r in records] == list(range(1, 51))
    assert verify_home(pg_home).intact
