"""Request ids: a caller's own id (``operation.serving("<text>")``) reaches every record of its
operations -- cache hits served by the plans' lanes included -- in every sink, and verifies.

A batch's items under one id are recorded as one run sharing it (stored row format 3).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kmsguard import Guard, operation
from kmsguard.audit import AuditSettings, Query, open_sink
from kmsguard.audit.record import REQUEST_ID, REQUEST_ID_MAX, RUN_ITEM, check_request_id
from kmsguard.config import load_settings
from kmsguard.errors import InvalidInput
from kmsguard.keyrings.local import LocalKeyring

from .conftest import records_of, verify_home, write_config

MADE = re.compile(r"[0-9a-f]{22}")
CONTEXT = {"tenant": "t-1"}


def _query(home: Path, **filters: object) -> list:  # type: ignore[type-arg]
    sink = open_sink(AuditSettings.of(load_settings({"KMSGUARD_HOME": str(home)})))
    try:
        return sink.query(Query(**filters))  # type: ignore[arg-type]
    finally:
        sink.close()


def _exercise(home: Path) -> None:
    with Guard.from_env({"KMSGUARD_HOME": str(home)}) as guard:
        sealed = [guard.encrypt(b"warm", "general", CONTEXT) for _ in range(3)]  # the lanes learn the kind
        with operation.serving("abc-123"):
            for i in range(5):
                guard.encrypt(b"x" * (i + 1), "general", CONTEXT)
            opened = [guard.decrypt(s, CONTEXT) for s in sealed]
        number, made = operation.new_request_id()
        with operation.serving(number):
            guard.encrypt(b"y", "general", CONTEXT)
            guard.encrypt(b"z", "general", CONTEXT)
        with operation.serving("batch.7"):
            results = guard.encrypt_many([b"a", b"b", b"c", b"d"], "general", CONTEXT, max_concurrency=2)
        guard.encrypt(b"after", "general", CONTEXT)
    assert opened == [b"warm"] * 3 and all(r.ok for r in results)
    (home / "made-id").write_text(made)


@pytest.mark.parametrize("sink", ["sqlite", "jsonl", "postgres"])
def test_a_callers_request_id_is_in_every_record_of_its_operations(
    sink: str, keyring: LocalKeyring, home: Path, request: pytest.FixtureRequest
) -> None:
    if sink == "postgres":
        home = request.getfixturevalue("pg_home")
    else:
        write_config(home, {"sink": sink, "delivery": "thread", "flush_interval": 0.05})
    _exercise(home)
    made = (home / "made-id").read_text()
    records = records_of(home)[:-1]  # without writer-closed
    ids = [r.request_id for r in records]
    assert ids[3:13] == ["abc-123"] * 8 + [made] * 2
    assert ids[13:17] == ["batch.7"] * 4
    assert all(MADE.fullmatch(i) for i in ids[:3] + ids[17:]) and len(set(ids[:3] + ids[17:])) == 4
    hits = [r for r in records if r.request_id == "abc-123" and r.run is not None and r.run.items]
    assert len(hits) >= 2, "the lanes' cache hits should be stored as runs sharing the id"
    assert all(r.run.items[RUN_ITEM.size - 8 : RUN_ITEM.size] == bytes(8) for r in hits)  # request number 0
    assert verify_home(home).intact
    found = _query(home, request_id="abc-123")
    assert [(r.operation, r.size) for r in found] == [("encrypt", i) for i in range(1, 6)] + [("decrypt", 4)] * 3
    assert [r.size for r in _query(home, request_id=made)] == [1, 1]
    assert len(_query(home, request_id="batch.7", limit=2)) == 2
    assert _query(home, request_id="abc-12") == []


def test_a_records_request_id_in_a_run_cannot_be_changed_unnoticed(keyring: LocalKeyring, home: Path) -> None:
    """The row's id is signed; so is each item's request number (0: the row's id), in a version 3 MAC."""
    import sqlite3

    write_config(home, {"delivery": "thread", "flush_interval": 0.05})
    _exercise(home)
    db = sqlite3.connect(home / "audit.db")
    try:
        with db:
            changed = db.execute(
                "UPDATE audit_records SET request_id = 'abc-124' WHERE request_id = 'abc-123' AND last_seq > seq"
            ).rowcount
    finally:
        db.close()
    assert changed >= 1
    report = verify_home(home)
    assert [p.kind for p in report.problems] == ["altered"]


def test_serving_refuses_an_id_a_record_may_not_hold() -> None:
    for bad in ("", "a b", "x" * (REQUEST_ID_MAX + 1), "naïve", "new\nline", "semi;colon"):
        with pytest.raises(InvalidInput) as refused, operation.serving(bad):
            pass
        assert bad not in str(refused.value) or bad == ""


@given(st.text(max_size=REQUEST_ID_MAX + 2))
def test_check_request_id_accepts_exactly_the_documented_set(text: str) -> None:
    ok = 1 <= len(text) <= REQUEST_ID_MAX and all(c.isascii() and (c.isalnum() or c in "._:/+=-") for c in text)
    if ok:
        assert check_request_id(text) == text and REQUEST_ID.fullmatch(text)
    else:
        with pytest.raises(InvalidInput):
            check_request_id(text)
