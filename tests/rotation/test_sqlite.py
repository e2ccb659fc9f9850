"""SQLite sources: --workers 2 (processes sharing the database's write lock), binary column, --class filter."""

from __future__ import annotations

import json
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest

from kmsguard import Guard, envelope
from kmsguard.errors import InvalidInput
from kmsguard.rotation.sources import open_source

from .conftest import cli, refs, rotate, sealed

ROWS = 1200


def test_two_workers_binary_column_and_class_filter(local_home: Path, tmp_path: Path) -> None:
    pii = [envelope.from_text(t) for t in sealed(local_home, [f"p{n}" for n in range(ROWS)])]
    general = [envelope.from_text(t) for t in sealed(local_home, [f"g{n}" for n in range(100)], "general")]
    db = tmp_path / "app.db"
    with closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)")
        conn.executemany("INSERT INTO t (v) VALUES (?)", [(v,) for v in pii + general])
    rotate(local_home)
    rotate(local_home, "general")
    url = f"sqlite:///{db}?table=t&column=v&key=id"

    out = cli(local_home, "rewrap", url, "--class", "pii", "--workers", "2", "--batch", "100", "--json")
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert (summary["changed"], summary["current"], summary["failed"]) == (ROWS, 100, 0)
    assert summary["batches_done"] == summary["batches"] == 13
    with closing(sqlite3.connect(db)) as conn, conn:
        stored = [v for (v,) in conn.execute("SELECT v FROM t ORDER BY id")]
    with Guard.from_env({"KMSGUARD_HOME": str(local_home)}) as guard:
        for n, value in enumerate(stored):
            assert isinstance(value, bytes)  # binary stays binary
            if n < ROWS:
                assert refs(value) == ("local:pii:v2",) and guard.decrypt(value) == f"p{n}".encode()
            else:
                assert refs(value) == ("local:general:v1",)  # another class: left alone


def test_payment_requires_context_and_gets_its_own(local_home: Path, tmp_path: Path) -> None:
    """A class that requires context at decrypt is rewrapped with the header's context."""
    with Guard.from_env({"KMSGUARD_HOME": str(local_home)}) as guard:
        tokens = [guard.encrypt_text(f"card {n}", "payment", {"purpose": "refund", "n": str(n)}) for n in range(30)]
    db = tmp_path / "pay.db"
    with closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("CREATE TABLE cards (id INTEGER PRIMARY KEY, token TEXT)")
        conn.executemany("INSERT INTO cards (token) VALUES (?)", [(t,) for t in tokens])
    rotate(local_home, "payment")
    out = cli(local_home, "rewrap", f"sqlite://{db}?table=cards&column=token&key=id", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["changed"] == 30
    with closing(sqlite3.connect(db)) as conn, conn, Guard.from_env({"KMSGUARD_HOME": str(local_home)}) as guard:
        for n, (token,) in enumerate(conn.execute("SELECT token FROM cards ORDER BY id")):
            assert refs(token) == ("local:payment:v2",)
            assert guard.decrypt_text(token, {"purpose": "refund"}) == f"card {n}"
            assert guard.inspect(token).context == {"purpose": "refund", "n": str(n)}


def test_garbled_headers_are_failures_not_crashes(local_home: Path, tmp_path: Path) -> None:
    good = envelope.from_text(sealed(local_home, ["x"])[0])
    garbled = good.replace(b"\x03pii", b"\x03p\xffi", 1)  # a non-ASCII classification
    unknown = good.replace(b"\x03pii", b"\x03zzz", 1)  # a classification nobody configured
    db = tmp_path / "g.db"
    with closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)")
        conn.executemany("INSERT INTO t (v) VALUES (?)", [(good,), (garbled,), (unknown,), (b"KG\x01\x01",)])
    rotate(local_home)
    out = cli(local_home, "rewrap", f"sqlite://{db}?table=t&column=v&key=id", "--json")
    assert out.returncode == 1, out.stderr
    summary = json.loads(out.stdout)
    assert summary["changed"] == 1 and summary["failed"] == 3
    assert sorted(f["key"] for f in summary["failures"]) == ["2", "3", "4"]
    assert "Traceback" not in out.stderr
    with closing(sqlite3.connect(db)) as conn, conn:
        left = [v for (v,) in conn.execute("SELECT v FROM t WHERE id > 1 ORDER BY id")]
    assert left == [garbled, unknown, b"KG\x01\x01"]


def test_a_table_without_the_column_is_refused_and_its_connection_closed(
    tmp_path: Path, sqlite_connections: list[sqlite3.Connection]
) -> None:
    db = tmp_path / "app.db"
    with closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY)")
    source = open_source(f"sqlite:///{db}?table=t&column=v&key=id")
    with pytest.raises(InvalidInput, match="no column 'id' / 'v'"):
        list(source.values(10))
    [_table_made, refused] = sqlite_connections
    with pytest.raises(sqlite3.ProgrammingError, match="closed"):
        refused.execute("SELECT 1")
