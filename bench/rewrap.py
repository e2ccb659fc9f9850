"""Stored data at scale: census, rewrap and migrate of a PostgreSQL column, in rows per second.

``python -m bench rewrap`` builds a table of N rows (``KMSGUARD_BENCH_ROWS``, default
100,000) in a throwaway schema of the PostgreSQL at ``KMSGUARD_BENCH_PG_DSN`` (default
``postgresql://postgres@127.0.0.1:5432/test``), then times, each as real ``kmsguard``
processes (start-up included):

- ``census`` (in this process: headers only, no key service);
- ``rewrap`` after a rotation (local) or a key change (AWS, moto behind kmsguard's
  counting proxy), with 1 and 2 workers;
- ``migrate`` of plaintext, with 1 and 2 workers, and once with ``--context-from``
  (a context per row: one data key per row).

Values are ``kg1:`` tokens of 10-character plaintexts made with the default cache on
(``pii``: 1,000 messages per data key). Key calls are what the job table recorded
(requests that reached the keyring stack); for AWS also the KMS calls the proxy counted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg

from bench.common import table
from bench.local_kms import local_regions
from kmsguard import Guard
from kmsguard.keyrings.local import KEY_FILE_NAME, LocalKeyring
from kmsguard.rotation import census
from kmsguard.rotation.sources import open_source

ROWS = int(os.environ.get("KMSGUARD_BENCH_ROWS", "100000"))
DSN = os.environ.get("KMSGUARD_BENCH_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")


def main() -> None:
    schema = f"kmsguard_bench_{uuid.uuid4().hex[:8]}"
    rows: list[list[str]] = []
    with psycopg.connect(DSN, autocommit=True) as conn, tempfile.TemporaryDirectory() as tmp:
        conn.execute(f'CREATE SCHEMA "{schema}"')
        try:
            _local(conn, schema, Path(tmp) / "local", rows)
            _aws(conn, schema, Path(tmp) / "aws", rows)
        finally:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
    print(f"{ROWS:,} rows, batch 500")
    print(table(["backend", "operation", "workers", "rows/s", "key calls", "KMS calls", "changed"], rows))


def _local(conn: psycopg.Connection[Any], schema: str, home: Path, out: list[list[str]]) -> None:
    LocalKeyring.create(home / KEY_FILE_NAME, ["general", "pii", "payment"])
    env = _env(home, {})
    _fill(conn, schema, "tokens", _tokens(env))
    url = _url(schema, "tokens")
    source = open_source(url)
    t0 = time.perf_counter()
    counted = census.take(source)
    elapsed = time.perf_counter() - t0
    assert counted.total == ROWS
    out.append(["-", "census", "1", f"{ROWS / elapsed:,.0f}", "0", "-", "-"])
    for workers in (1, 2):
        LocalKeyring(home / KEY_FILE_NAME).rotate("pii")
        out.append(["local", "rewrap", str(workers), *_timed(env, "rewrap", url, workers)])
    for workers in (1, 2):
        name = f"plain{workers}"
        _fill(conn, schema, name, [f"P{n:09d}" for n in range(ROWS)])
        measured = _timed(env, "migrate", _url(schema, name), workers, "--class", "pii")
        out.append(["local", "migrate", str(workers), *measured])
    _fill(conn, schema, "plainctx", [f"P{n:09d}" for n in range(ROWS)])
    args = ("--class", "pii", "--context-from", "booking=id")
    out.append(["local", "migrate, context per row", "1", *_timed(env, "migrate", _url(schema, "plainctx"), 1, *args)])


def _aws(conn: psycopg.Connection[Any], schema: str, home: Path, out: list[list[str]]) -> None:
    with local_regions("us-east-1") as (region,):
        aws = {
            "KMSGUARD_BACKEND": "aws",
            "KMSGUARD_APP": "bench",
            "AWS_REGION": region.name,
            "AWS_DEFAULT_REGION": region.name,
            "AWS_ENDPOINT_URL_KMS": region.endpoint,
            **{f"KMSGUARD_KEY_{c.upper()}": region.create_key() for c in ("general", "pii", "payment")},
        }
        env = _env(home, aws)
        _fill(conn, schema, "aws_tokens", _tokens(env))
        url = _url(schema, "aws_tokens")
        for workers in (1, 2):
            env["KMSGUARD_KEY_PII"] = region.create_key()  # the class moves to another key
            region.proxy.reset_counts()
            measured = _timed(env, "rewrap", url, workers)
            measured[2] = str(region.proxy.counts.total())
            out.append(["aws (moto)", "rewrap", str(workers), *measured])
        for workers in (1, 2):
            name = f"aws_plain{workers}"
            _fill(conn, schema, name, [f"P{n:09d}" for n in range(ROWS)])
            region.proxy.reset_counts()
            measured = _timed(env, "migrate", _url(schema, name), workers, "--class", "pii")
            measured[2] = str(region.proxy.counts.total())
            out.append(["aws (moto)", "migrate", str(workers), *measured])


def _env(home: Path, extra: dict[str, str]) -> dict[str, str]:
    home.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("KMSGUARD_")}
    return {**env, "KMSGUARD_HOME": str(home), **extra}


def _tokens(env: dict[str, str]) -> list[str]:
    with Guard.from_env(env) as guard:
        return [guard.encrypt_text(f"P{n:09d}", "pii") for n in range(ROWS)]


def _fill(conn: psycopg.Connection[Any], schema: str, name: str, values: list[str]) -> None:
    conn.execute(f'CREATE TABLE "{schema}".{name} (id bigint PRIMARY KEY, passport text)')
    with conn.cursor().copy(f'COPY "{schema}".{name} (id, passport) FROM STDIN') as copy:
        for n, value in enumerate(values, 1):
            copy.write_row((n, value))
    conn.execute(f'ANALYZE "{schema}".{name}')


def _url(schema: str, name: str) -> str:
    return f"{DSN}?table={schema}.{name}&column=passport&key=id"


def _timed(env: dict[str, str], command: str, url: str, workers: int, *args: str) -> list[str]:
    """[rows/s, key calls, KMS calls (filled in by the caller), changed] of one run."""
    argv = [sys.executable, "-m", "kmsguard", command, url, *args, "--workers", str(workers), "--progress", "none"]
    t0 = time.perf_counter()
    proc = subprocess.run([*argv, "--json"], env=env, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{command} failed: {proc.stderr}")
    summary = json.loads(proc.stdout)
    assert summary["rows"] == ROWS, summary
    return [f"{ROWS / elapsed:,.0f}", str(summary["key_calls"]), "-", str(summary["changed"])]


if __name__ == "__main__":
    main()
