"""Rewrap of a PostgreSQL column: three worker processes, one SIGKILLed and restarted, an application writing."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg

from kmsguard import Guard

from .conftest import PG_DSN, ROOT, cli, env_of, fill, pg_url, refs, rotate, sealed, start, wrapped_section

ROWS = 3000
BATCH = 100


def _job_rows(conn: psycopg.Connection, schema: str) -> list[dict]:
    cur = conn.execute(
        f"SELECT run, batch, lo, hi, state, worker, rows, changed, current, skipped, failed, key_calls, failures "
        f'FROM "{schema}".kmsguard_rewrap ORDER BY run, batch'
    )
    names = [d.name for d in cur.description]
    return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]


def test_three_workers_one_killed_and_an_application_writing(
    local_home: Path, pg: psycopg.Connection, pg_schema: str
) -> None:
    plain = [f"P{n:07d}" for n in range(1, ROWS + 1)]
    tokens = sealed(local_home, plain)
    fill(pg, pg_schema, tokens)
    rotate(local_home)
    url = pg_url(pg_schema)
    # Distinct data keys per batch, for the key-service call bound below.
    sections = {n: wrapped_section(t) for n, t in enumerate(tokens, 1)}

    app = subprocess.Popen(
        [sys.executable, "-m", "tests.rotation.app", PG_DSN, f'"{pg_schema}".bookings', str(ROWS), "6"],
        env=env_of(local_home),
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    # Slow enough (3 x 150 rows/s: about 7 s) that the restarted worker, whose start-up takes
    # seconds on a loaded machine, joins the job before the others finish it.
    args = ("rewrap", url, "--batch", str(BATCH), "--max-rate", "150", "--json")
    workers = [start(local_home, *args) for _ in range(3)]
    # Kill one worker once the job is under way, mid-batch or between batches.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        time.sleep(0.2)
        try:
            done = pg.execute(f"SELECT count(*) FROM \"{pg_schema}\".kmsguard_rewrap WHERE state = 'done'").fetchone()[
                0
            ]
        except psycopg.errors.UndefinedTable:
            continue
        if done >= 3:
            break
    workers[0].send_signal(signal.SIGKILL)
    workers[0].communicate()  # reaped, and its pipes closed
    # Restarted as another host would name the database: the same job, joined.
    other_spelling = url.replace("postgresql://", "postgres://", 1)
    workers[0] = start(local_home, "rewrap", other_spelling, *args[2:])
    outs = [w.communicate(timeout=300) for w in workers]
    app_out, _ = app.communicate(timeout=60)
    for w, (_out, err) in zip(workers, outs, strict=True):
        assert w.returncode == 0, err
    written = {int(k): v for k, v in json.loads(app_out).items()}
    assert written, "the application wrote nothing during the run"

    # Every row decrypts to its plaintext (the application's last write where it wrote) under v2.
    expected = {n: written.get(n, plain[n - 1]) for n in range(1, ROWS + 1)}
    rows = pg.execute(f'SELECT id, passport FROM "{pg_schema}".bookings ORDER BY id').fetchall()
    with Guard.from_env({"KMSGUARD_HOME": str(local_home)}) as guard:
        for n, token in rows:
            assert refs(token) == ("local:pii:v2",)
            assert guard.decrypt_text(token) == expected[n]

    # The job table: one run, every batch done once, every row counted once; the killed
    # worker's batch was rolled back and done by another.
    jobs = _job_rows(pg, pg_schema)
    assert {j["run"] for j in jobs} == {1}
    assert all(j["state"] == "done" for j in jobs)
    assert len(jobs) == ROWS // BATCH
    assert sum(j["rows"] for j in jobs) == ROWS
    assert sum(j["changed"] + j["skipped"] + j["current"] for j in jobs) == ROWS
    assert sum(j["failed"] for j in jobs) == 0
    assert len({j["worker"] for j in jobs}) >= 3  # the restarted worker is a new process
    # Each batch: at most one unwrap and one rewrap per distinct data key it held, plus
    # a worker's one probe of the current key.
    for j in jobs:
        lo = int(j["lo"]) if j["lo"] is not None else 0
        hi = int(j["hi"]) if j["hi"] is not None else ROWS
        distinct = len({sections[n] for n in range(lo + 1, hi + 1)})
        assert j["key_calls"] <= 2 * distinct + 1, j
    # Rows the application rewrote under v2 meanwhile were "current" or "skipped", never overwritten.
    assert sum(j["current"] + j["skipped"] for j in jobs) >= 1

    # A second run plans a new run and changes nothing.
    again = cli(local_home, "rewrap", url, "--json")
    assert again.returncode == 0, again.stderr
    summary = json.loads(again.stdout)
    assert summary["run"] == 2 and summary["changed"] == 0 and summary["current"] == ROWS


def test_dry_run_then_tampered_value_is_reported_not_rewritten(
    local_home: Path, pg: psycopg.Connection, pg_schema: str
) -> None:
    tokens = sealed(local_home, [f"secret-{n}" for n in range(200)])
    tampered = tokens[17][:-6] + ("A" if tokens[17][-6] != "A" else "B") + tokens[17][-5:]
    tokens[17] = tampered
    fill(pg, pg_schema, [*tokens, None], binary=False)
    rotate(local_home)
    url = pg_url(pg_schema)

    before = pg.execute(f'SELECT id, passport FROM "{pg_schema}".bookings ORDER BY id').fetchall()
    dry = cli(local_home, "rewrap", url, "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout) | {"source": None} == {
        "dry_run": True,
        "source": None,
        "rows": 200,
        "would_change": 200,
        "current": 0,
        "not_envelopes": 0,
    }
    assert pg.execute(f'SELECT id, passport FROM "{pg_schema}".bookings ORDER BY id').fetchall() == before
    assert pg.execute("SELECT to_regclass(%s)", (f'"{pg_schema}".kmsguard_rewrap',)).fetchone()[0] is None

    run = cli(local_home, "rewrap", url, "--batch", "50")
    assert run.returncode == 1
    assert "199 changed" in run.stdout and "1 failed" in run.stdout
    assert "failed: 18: INVALID_CIPHERTEXT" in run.stderr
    for secret in ("secret-", tampered, tokens[0]):
        assert secret not in run.stdout + run.stderr
    after = dict(pg.execute(f'SELECT id, passport FROM "{pg_schema}".bookings').fetchall())
    assert after[18] == tampered
    assert sum(1 for t in after.values() if t and refs(t) == ("local:pii:v2",)) == 199
    assert after[201] is None
