"""Migrate of plaintext PostgreSQL rows: two workers, one SIGKILLed and restarted, context from the row."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import psycopg
import pytest

from kmsguard import Guard
from kmsguard.errors import InvalidCiphertext

from .conftest import cli, fill, pg_url, start

ROWS = 2000


def test_two_workers_one_killed_context_from_row(local_home: Path, pg: psycopg.Connection, pg_schema: str) -> None:
    plain = [f"X{n:08d}" for n in range(1, ROWS + 1)]
    fill(pg, pg_schema, [*plain[:-1], None])  # the last row holds NULL: not a value
    url = pg_url(pg_schema)
    before = json.loads(cli(local_home, "census", url, "--json").stdout)
    assert before["not_envelopes"] == ROWS - 1 and before["groups"] == []

    args = ("migrate", url, "--class", "pii", "--context-from", "booking=id", "--batch", "50", "--max-rate", "1000")
    workers = [start(local_home, *args) for _ in range(2)]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        time.sleep(0.2)
        try:
            row = pg.execute(f"SELECT count(*) FROM \"{pg_schema}\".kmsguard_rewrap WHERE state = 'done'").fetchone()
        except psycopg.errors.UndefinedTable:
            continue
        if row[0] >= 3:
            break
    workers[0].send_signal(signal.SIGKILL)
    workers[0].communicate()  # reaped, and its pipes closed
    workers[0] = start(local_home, *args)
    for w in workers:
        out, err = w.communicate(timeout=300)
        assert w.returncode == 0, err
        assert "X0000" not in out + err  # no plaintext in progress or summary

    rows = pg.execute(f'SELECT id, passport FROM "{pg_schema}".bookings ORDER BY id').fetchall()
    with Guard.from_env({"KMSGUARD_HOME": str(local_home)}) as guard:
        for n, token in rows[:-1]:
            assert token.startswith("kg1:")
            assert guard.decrypt_text(token, {"booking": str(n)}) == plain[n - 1]
            assert guard.inspect(token).context == {"booking": str(n)}
        # A token copied into another row fails there.
        with pytest.raises(Exception) as caught:
            guard.decrypt_text(rows[0][1], {"booking": "2"})
        assert getattr(caught.value, "code", None) in ("CONTEXT_MISMATCH", InvalidCiphertext.code)
    assert rows[-1][1] is None

    jobs = pg.execute(f'SELECT state, rows, changed FROM "{pg_schema}".kmsguard_rewrap').fetchall()
    assert all(state == "done" for state, _, _ in jobs)
    assert sum(changed for _, _, changed in jobs) == ROWS - 1

    again = cli(local_home, *args, "--json")
    assert again.returncode == 0 and json.loads(again.stdout)["changed"] == 0
    after = json.loads(cli(local_home, "census", url, "--json").stdout)
    assert after["not_envelopes"] == 0
    assert after["groups"] == [{"classification": "pii", "keys": ["local:pii:v1"], "regions": [], "count": ROWS - 1}]
