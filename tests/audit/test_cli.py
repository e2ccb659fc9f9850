"""``kmsguard audit verify|tail|query`` and ``kmsguard metrics``."""

from __future__ import annotations

import json
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest
from click.testing import CliRunner

from kmsguard import Guard
from kmsguard.cli.main import cli
from kmsguard.errors import ContextMismatch
from kmsguard.keyrings.local import LocalKeyring


@pytest.fixture
def audited(keyring: LocalKeyring, home: Path) -> Path:
    with Guard.from_env({"KMSGUARD_HOME": str(home), "KMSGUARD_PRINCIPAL": "alice"}) as guard:
        for i in range(3):
            guard.encrypt(b"x", "general", {"i": str(i)})
        sealed = guard.encrypt(b"y", "payment", {"purpose": "refund"})
        with pytest.raises(ContextMismatch):
            guard.decrypt(sealed, {"purpose": "chargeback"})
    with Guard.from_env({"KMSGUARD_HOME": str(home), "KMSGUARD_PRINCIPAL": "bob"}) as guard:
        guard.decrypt(sealed, {"purpose": "refund"})
    return home


def run(*args: str) -> tuple[int, str]:
    result = CliRunner(env={"COLUMNS": "250"}).invoke(cli, list(args))
    return result.exit_code, result.output


def test_verify_intact_then_tampered(audited: Path) -> None:
    code, out = run("audit", "verify")
    assert code == 0 and out.startswith("intact: 8 records from 2 writers")
    with closing(sqlite3.connect(audited / "audit.db")) as conn, conn:
        conn.execute("UPDATE audit_records SET outcome = 'ok' WHERE outcome = 'error'")
    code, out = run("audit", "verify")
    assert code == 1 and "TAMPERED" in out and "record 5: altered" in out
    code, out = run("audit", "verify", "--json")
    report = json.loads(out)
    assert code == 1 and not report["intact"] and report["problems"][0]["kind"] == "altered"
    assert len(report["audit_key"]) == 16


def test_verify_against_an_anchor_catches_a_deleted_writer(audited: Path, tmp_path: Path) -> None:
    anchor = tmp_path / "anchor.json"
    code, out = run("audit", "verify", "--save-anchor", str(anchor))
    assert code == 0 and "anchor saved" in out and "2 chain heads" in out
    assert run("audit", "verify", "--anchor", str(anchor))[0] == 0
    with closing(sqlite3.connect(audited / "audit.db")) as conn, conn:
        (bob,) = conn.execute("SELECT writer_id FROM audit_records WHERE principal = 'bob'").fetchone()
        conn.execute("DELETE FROM audit_records WHERE writer_id = ?", (bob,))
    assert run("audit", "verify")[0] == 0
    code, out = run("audit", "verify", "--anchor", str(anchor), "--save-anchor", str(anchor))
    assert code == 1 and f"TAMPERED: writer {bob} record 2: removed" in out and "no anchor saved" in out
    assert json.loads(anchor.read_text())["writers"][bob]["seq"] == 2  # the anchor is kept as it was


def test_tail_json_lines(audited: Path) -> None:
    code, out = run("audit", "tail", "-n", "2", "--json")
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [r["operation"] for r in rows] == ["decrypt", "writer-closed"]
    assert rows[0]["principal"] == "bob"


def test_query_filters(audited: Path) -> None:
    code, out = run("audit", "query", "--class", "payment", "--json")
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [(r["operation"], r["outcome"]) for r in rows] == [
        ("encrypt", "ok"),
        ("decrypt", "error"),
        ("decrypt", "ok"),
    ]
    _, out = run("audit", "query", "--outcome", "error", "--json")
    [row] = [json.loads(line) for line in out.splitlines()]
    assert row["error_code"] == "CONTEXT_MISMATCH" and row["principal"] == "alice"
    _, out = run("audit", "query", "--principal", "bob", "--op", "decrypt", "--since", "1h", "--json")
    assert len(out.splitlines()) == 1
    _, out = run("audit", "query", "--since", "2999-01-01", "--json")
    assert out == ""


def test_tail_table(audited: Path) -> None:
    code, out = run("audit", "tail")
    assert code == 0 and "payment" in out and "CONTEXT_MISMATCH" in out


def test_bad_since_is_a_usage_error(audited: Path) -> None:
    code, out = run("audit", "query", "--since", "yesterday-ish")
    assert code == 2 and "--since" in out


def test_metrics_command_counts_what_the_audit_trail_holds(audited: Path) -> None:
    code, out = run("metrics")
    assert code == 0 and "kmsguard_audit_spool_bytes 0.0" in out
    assert 'kmsguard_operations_total{classification="general",operation="encrypt",outcome="ok"} 3.0' in out
    assert 'kmsguard_operations_total{classification="payment",operation="decrypt",outcome="error"} 1.0' in out
    errors = 'kmsguard_operation_errors_total{classification="payment",code="CONTEXT_MISMATCH",operation="decrypt"}'
    assert f"{errors} 1.0" in out
    assert 'kmsguard_cache_events_total{classification="general",event="miss"} 3.0' in out
    assert "writer-closed" not in out
    code, out = run("metrics", "--since", "1m")
    assert code == 0 and 'operation="encrypt",outcome="ok"} 3.0' in out
    code, out = run("metrics", "--since", "2999-01-01T00:00")
    assert code == 0 and "kmsguard_operations_total{" not in out


def test_none_sink_has_nothing_to_read(keyring: LocalKeyring, home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KMSGUARD_AUDIT_SINK", "none")
    code, out = run("audit", "tail")
    assert code == 1 and "CONFIGURATION_ERROR" in out


def test_key_management_is_audited(audited: Path) -> None:
    assert run("keys", "rotate", "--class", "pii")[0] == 0
    assert run("keys", "disable", "--class", "pii", "--version", "1")[0] == 0
    code, out = run("keys", "disable", "--class", "pii", "--version", "2")  # the primary: refused
    assert code == 1
    _, out = run("audit", "query", "--class", "pii", "--json")
    rows = [json.loads(line) for line in out.splitlines()]
    ops = [(r["operation"], r["outcome"], r["key_refs"]) for r in rows if r["operation"].startswith("keys.")]
    assert ops == [
        ("keys.rotate", "ok", ["local:pii:v2"]),
        ("keys.disable", "ok", ["local:pii:v1"]),
        ("keys.disable", "error", []),
    ]
    assert run("audit", "verify")[0] == 0
