"""AWS KMS (moto through the fault proxy): a class moved to a new key, census by ARN, rewrap, retire --key."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path

from kmsguard import Guard, envelope
from kmsguard.testing import KmsRegion

ROWS = 300


def run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kmsguard", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=120,
    )


def test_key_change_census_rewrap_retire(
    kmsguard_aws_env: dict[str, str], kms_region: KmsRegion, tmp_path: Path
) -> None:
    old = kmsguard_aws_env["pii"]
    db = tmp_path / "app.db"
    with Guard.from_env() as guard, closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("CREATE TABLE people (id INTEGER PRIMARY KEY, passport BLOB)")
        conn.executemany(
            "INSERT INTO people VALUES (?, ?)", [(n, guard.encrypt(f"P{n}".encode(), "pii")) for n in range(ROWS)]
        )
    url = f"sqlite://{db}?table=people&column=passport&key=id"
    new = kms_region.create_key()  # the class moves to another key (another account, a multi-region key...)
    moved = {"KMSGUARD_KEY_PII": new}

    census = json.loads(run("census", url, "--json", **moved).stdout)
    assert census["groups"] == [{"classification": "pii", "keys": [old], "regions": [kms_region.name], "count": ROWS}]

    refused = run("keys", "retire", "--key", old, "--source", url, **moved)
    assert refused.returncode == 1 and "KEY_IN_USE" in refused.stderr and f"{ROWS} envelope(s)" in refused.stderr
    assert kms_region.admin.describe_key(KeyId=old)["KeyMetadata"]["KeyState"] == "Enabled"

    with closing(sqlite3.connect(db)) as conn, conn:
        distinct = len({envelope.parse(v).wrapped_keys for (v,) in conn.execute("SELECT passport FROM people")})
    kms_region.proxy.reset_counts()
    done = run("rewrap", url, "--batch", "100", "--json", **moved)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["changed"] == ROWS and summary["batches"] == ROWS // 100
    # Shared data keys (the cache was on): per batch at most one Decrypt and one ReEncrypt
    # per distinct data key, and one GenerateDataKey (the probe of the current key).
    calls = kms_region.proxy.counts
    assert calls["Decrypt"] <= distinct * summary["batches"] and calls["ReEncrypt"] <= distinct * summary["batches"]
    assert calls["GenerateDataKey"] == 1 and calls["ReEncrypt"] >= 1
    # The job counts its own calls: the process' one Decrypt of the audit trail's key is not the job's.
    assert summary["key_calls"] == sum(calls[api] for api in ("Decrypt", "ReEncrypt", "GenerateDataKey")) - 1

    census = json.loads(run("census", url, "--json", **moved).stdout)
    assert [(g["keys"], g["count"]) for g in census["groups"]] == [([new], ROWS)]
    with Guard.from_env(dict(os.environ, **moved)) as guard, closing(sqlite3.connect(db)) as conn, conn:
        for n, value in conn.execute("SELECT id, passport FROM people"):
            assert guard.decrypt(value) == f"P{n}".encode()

    retired = run("keys", "retire", "--key", old, "--source", url, **moved)
    assert retired.returncode == 0, retired.stderr
    assert kms_region.admin.describe_key(KeyId=old)["KeyMetadata"]["KeyState"] == "Disabled"
    assert kms_region.admin.describe_key(KeyId=new)["KeyMetadata"]["KeyState"] == "Enabled"

    # With nothing named, the recorded census is the evidence; deletion is scheduled too.
    scheduled = run("keys", "retire", "--key", old, "--schedule-deletion", "7", **moved)
    assert scheduled.returncode == 0, scheduled.stderr
    assert kms_region.admin.describe_key(KeyId=old)["KeyMetadata"]["KeyState"] == "PendingDeletion"
    bad = run("keys", "retire", "--key", old, "--schedule-deletion", "3", **moved)
    assert bad.returncode == 2
