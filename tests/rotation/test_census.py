"""The census: exact counts against tables built with known counts per version; skim against parse."""

from __future__ import annotations

import json
import sqlite3
from contextlib import closing
from pathlib import Path

import psycopg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kmsguard import Guard, envelope
from kmsguard.errors import InvalidCiphertext
from kmsguard.rotation.census import _Skimmer, skim

from .conftest import cli, fill, pg_url, rotate, sealed

COUNTS = {1: 120, 2: 75, 3: 40}


def _versions(home: Path, binary: bool) -> list[bytes | str | None]:
    """COUNTS[v] pii values under local:pii:vN, 10 general ones, 7 plaintexts, 5 NULLs."""
    values: list[bytes | str | None] = []
    for version, n in COUNTS.items():
        if version > 1:
            rotate(home)
        tokens = sealed(home, [f"v{version}-{i}" for i in range(n)])
        values += [envelope.from_text(t) for t in tokens] if binary else tokens
    general = sealed(home, [f"g{i}" for i in range(10)], "general")
    values += [envelope.from_text(t) for t in general] if binary else general
    values += [b"plain %d" % i if binary else f"plain {i}" for i in range(7)] + [None] * 5
    return values


def _expected() -> list[dict[str, object]]:
    groups = [
        {"classification": "general", "keys": ["local:general:v1"], "regions": [], "count": 10},
        *[
            {"classification": "pii", "keys": [f"local:pii:v{v}"], "regions": [], "count": n}
            for v, n in sorted(COUNTS.items())
        ],
    ]
    return groups


def test_postgres_counts_exact_binary(local_home: Path, pg: psycopg.Connection, pg_schema: str) -> None:
    fill(pg, pg_schema, _versions(local_home, binary=True), binary=True)
    out = cli(local_home, "census", pg_url(pg_schema), "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["groups"] == _expected()
    assert (doc["envelopes"], doc["not_envelopes"], doc["total"]) == (
        sum(COUNTS.values()) + 10,
        7,
        sum(COUNTS.values()) + 17,
    )
    assert "plain" not in out.stdout + out.stderr


def test_postgres_text_with_where_and_status(local_home: Path, pg: psycopg.Connection, pg_schema: str) -> None:
    fill(pg, pg_schema, _versions(local_home, binary=False))
    out = cli(local_home, "census", pg_url(pg_schema, where="id <= 120"), "--json")
    assert json.loads(out.stdout)["groups"] == [
        {"classification": "pii", "keys": ["local:pii:v1"], "regions": [], "count": 120}
    ]
    full = json.loads(cli(local_home, "census", pg_url(pg_schema), "--json").stdout)
    assert full["groups"] == _expected() and full["not_envelopes"] == 7
    status = cli(local_home, "keys", "status")
    assert status.returncode == 0, status.stderr
    assert "local:pii:v2" in status.stdout and "(not envelopes)" in status.stdout and "bookings" in status.stdout


def test_sqlite_counts_exact(local_home: Path, tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    with closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)")
        conn.executemany("INSERT INTO t (v) VALUES (?)", [(v,) for v in _versions(local_home, binary=True)])
    doc = json.loads(cli(local_home, "census", f"sqlite:///{db}?table=t&column=v&key=id", "--json").stdout)
    assert doc["groups"] == _expected() and doc["not_envelopes"] == 7


def test_bad_sources_are_usage_errors(local_home: Path, tmp_path: Path) -> None:
    for url in (
        "postgresql://u:hunter2@127.0.0.1:1/db?table=t",
        "ftp://x",
        f"jsonl:{tmp_path}/none.jsonl?field=$.a",
        f"sqlite:///{tmp_path}/missing.db?table=t&column=c&key=id",
    ):
        out = cli(local_home, "census", url)
        assert out.returncode == 1 and out.stderr.startswith("error: "), out.stderr
        assert "hunter2" not in out.stderr
        assert not (tmp_path / "missing.db").exists()


_names = st.text(alphabet="abcdefghij", min_size=1, max_size=6)


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(
    context=st.dictionaries(_names, st.text(max_size=12), max_size=4),
    plaintext=st.binary(max_size=40),
    cut=st.integers(min_value=0, max_value=400),
)
def test_skim_agrees_with_parse(guard: Guard, context: dict[str, str], plaintext: bytes, cut: int) -> None:
    data = guard.encrypt(plaintext, "general", context)
    env = envelope.parse(data)
    expected = (b"general", tuple(w.key_ref.encode() for w in env.wrapped_keys))
    assert skim(data) == expected
    assert skim(envelope.to_text(data)) == expected
    assert skim(envelope.to_text(data).encode()) == expected
    # A truncation: skim accepts exactly what parse accepts (structure only; neither authenticates).
    truncated = data[: min(cut, len(data) - 1)]
    try:
        envelope.parse(truncated)
        parses = True
    except InvalidCiphertext:
        parses = False
    assert (skim(truncated) is not None) == parses
    # The census's memory of headers answers as skim does, for values sharing a header and not.
    skimmer = _Skimmer()
    text = envelope.to_text(data)
    for value in (data, truncated, data, text, text[: len(text) - cut // 3], text, plaintext, truncated):
        assert skimmer(value) == skim(value)
    assert skim(plaintext) is None or plaintext.startswith(b"KG")
