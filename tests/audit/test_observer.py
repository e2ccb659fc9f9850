"""AuditObserver through Guard: what a record holds, strict mode, disabled audit, crash recovery."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path

import pytest

from kmsguard import Guard
from kmsguard.audit import AuditObserver
from kmsguard.errors import AuditUnavailable, ContextRequired, UnknownClassification
from kmsguard.keyrings.local import LocalKeyring
from kmsguard.metrics import Metrics, of

from .conftest import records_of, start_worker, verify_home, write_config

#: A sink that is down: connections to it are refused at once.
SINK_DOWN = "postgresql://postgres@127.0.0.1:1/nowhere"


def observer_of(guard: Guard) -> AuditObserver:
    return next(o for o in guard.observers if isinstance(o, AuditObserver))


def test_every_operation_is_recorded_with_its_facts(keyring: LocalKeyring, home: Path) -> None:
    with Guard.from_env({"KMSGUARD_HOME": str(home), "KMSGUARD_PRINCIPAL": "svc-billing"}) as guard:
        sealed = guard.encrypt(b"card data", "payment", {"purpose": "refund", "order": "o-1"})
        guard.decrypt(sealed, {"purpose": "refund"})
        guard.rewrap(sealed, {"purpose": "refund"})
        with pytest.raises(UnknownClassification):
            guard.encrypt(b"x", "4111111111111111")
    records = records_of(home)
    assert [r.operation for r in records] == ["encrypt", "decrypt", "rewrap", "encrypt", "writer-closed"]
    enc, dec, _rewrap, bad, _close = records
    assert enc.classification == "payment" and enc.key_refs == ("local:payment:v1",) and enc.outcome == "ok"
    assert enc.principal == "svc-billing" and enc.size == len(b"card data") and enc.request_id
    assert set(enc.context) == {"order", "purpose"} and "refund" not in enc.context.values()
    assert dec.context["purpose"] == enc.context["purpose"]  # correlatable
    assert dec.classification == "payment" and dec.outcome == "ok"
    assert bad.outcome == "error" and bad.error_code == "UNKNOWN_CLASSIFICATION"
    assert bad.classification is None  # the caller's string is not recorded
    assert verify_home(home).intact


class Purpose(StrEnum):
    REFUND = "refund"


def test_a_context_of_str_subclasses_is_recorded_as_its_text(keyring: LocalKeyring, home: Path) -> None:
    # An enum member as a context value: the spool stores only plain str (marshal), and
    # an operation must neither fail for it nor go unrecorded, on any path.
    plain = {"purpose": "refund", "order": "o-1"}
    with Guard.from_env({"KMSGUARD_HOME": str(home)}) as guard:
        for _ in range(3):  # in full, then as hit frames
            sealed = guard.encrypt(b"card data", "general", {"purpose": Purpose.REFUND, "order": "o-1"})
            assert guard.decrypt(sealed, {"purpose": Purpose.REFUND}) == b"card data"
        with pytest.raises(ContextRequired):
            guard.encrypt(b"x", "payment", {"order": Purpose.REFUND})
        assert guard.inspect(sealed).context == plain
        guard.encrypt(b"card data", "general", plain)
    records = records_of(home)
    ops = [(r.operation, r.outcome) for r in records]
    rest = [("encrypt", "error"), ("encrypt", "ok"), ("writer-closed", "ok")]
    assert ops == [("encrypt", "ok"), ("decrypt", "ok")] * 3 + rest
    assert all(r.context == records[-2].context for r in records[:6:2])  # the same hashes as for plain text
    assert verify_home(home).intact


def test_jsonl_sink(keyring: LocalKeyring, home: Path) -> None:
    write_config(home, {"sink": "jsonl", "path": "logs/audit.jsonl"})
    with Guard.from_env({"KMSGUARD_HOME": str(home)}) as guard:
        guard.encrypt(b"x", "general", {"k": "v"})
    lines = (home / "logs" / "audit.jsonl").read_text().splitlines()
    assert len(lines) == 2 and '"operation":"encrypt"' in lines[0]
    assert verify_home(home).intact


def test_strict_refuses_when_the_record_cannot_be_made_durable(keyring: LocalKeyring, home: Path) -> None:
    with Guard.from_env({"KMSGUARD_HOME": str(home)}) as guard:
        obs = observer_of(guard)
        spool_fd = obs._spool._fd
        unsyncable, writer_end = os.pipe()  # fdatasync fails on it, as on a failing disk
        os.close(writer_end)
        obs._spool._fd = unsyncable
        try:
            with pytest.raises(AuditUnavailable):
                guard.encrypt(b"x", "payment", {"purpose": "p"})
            guard.encrypt(b"x", "general")  # non-strict: served without waiting for the disk
        finally:
            obs._spool._fd = spool_fd
            os.close(unsyncable)
        text = of(guard.observers).exposition().decode()  # type: ignore[union-attr]
        assert 'kmsguard_operations_total{classification="payment",operation="encrypt",outcome="error"} 1.0' in text
        assert 'kmsguard_operations_total{classification="general",operation="encrypt",outcome="ok"} 1.0' in text
        assert 'code="AUDIT_UNAVAILABLE"' in text
    # The refused operation's record reached the spool before the sync failed: the trail
    # shows it followed by its refusal, never as done.
    refused = [r for r in records_of(home) if r.classification == "payment"]
    assert [(r.outcome, r.error_code) for r in refused] == [("ok", None), ("error", "AUDIT_UNAVAILABLE")]
    assert refused[0].request_id == refused[1].request_id
    assert verify_home(home).intact


def test_strict_override_makes_every_class_strict(keyring: LocalKeyring, home: Path) -> None:
    write_config(home, {"strict": True, "sink": "postgres", "dsn": SINK_DOWN})
    with Guard.from_env({"KMSGUARD_HOME": str(home)}) as guard:
        obs = observer_of(guard)
        guard.encrypt(b"x", "general")  # strict: durable in the spool, though the sink is down
        assert not obs.flush(timeout=1)
        # The deliverer (a child process) reports the sink down once it has tried it: on a
        # loaded machine that can take longer than the flush above.
        deadline = time.monotonic() + 30
        while obs.sink_healthy and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not obs.sink_healthy
        obs._spool.frames.limit = 0  # a full spool, and a sink that is down: no room will come
        with pytest.raises(AuditUnavailable):
            guard.encrypt(b"x", "general")
        obs.close(timeout=0.5)


def test_disabled_audit_refuses_strict_classes_only(keyring: LocalKeyring, home: Path) -> None:
    with Guard.from_env({"KMSGUARD_HOME": str(home), "KMSGUARD_AUDIT_SINK": "none"}) as guard:
        guard.encrypt(b"x", "general")
        with pytest.raises(AuditUnavailable):
            guard.encrypt(b"x", "payment", {"purpose": "p"})
    assert not (home / "audit.db").exists()


def test_failed_operations_are_never_vetoed_into_another_error(keyring: LocalKeyring, home: Path) -> None:
    with (
        Guard.from_env({"KMSGUARD_HOME": str(home), "KMSGUARD_AUDIT_SINK": "none"}) as guard,
        pytest.raises(UnknownClassification),
    ):
        guard.encrypt(b"x", "nope")


def test_strict_records_are_on_disk_before_the_operation_returns(keyring: LocalKeyring, home: Path) -> None:
    write_config(home, {"flush_interval": 60})
    guard = Guard.from_env({"KMSGUARD_HOME": str(home)})
    obs = observer_of(guard)
    guard.encrypt(b"x", "payment", {"purpose": "p"})
    assert obs._spool._synced >= obs._spool.written > 0
    guard.close()


def test_kill_9_after_operations_returned_loses_nothing(keyring: LocalKeyring, home: Path) -> None:
    write_config(home, {"flush_interval": 60})  # the dead writer delivers nothing itself
    worker = start_worker(home, 40, "hang")
    assert worker.stdout is not None
    assert worker.stdout.readline().strip() == "returned 40"
    os.kill(worker.pid, signal.SIGKILL)
    worker.communicate()  # reaped, and its pipe closed
    with Guard.from_env({"KMSGUARD_HOME": str(home)}) as guard:  # the next writer on this host
        guard.encrypt(b"x", "general")
        assert observer_of(guard).flush(timeout=30)
    records = records_of(home)
    dead = [r for r in records if r.writer_id != observer_of(guard).writer_id]
    assert len(dead) == 40 and [r.seq for r in dead] == list(range(1, 41))
    report = verify_home(home)
    assert report.intact and len(report.open_writers) == 1  # the killed writer never closed its chain
    assert list((home / "audit-spool").glob("*.spool")) == []


def test_metrics_count_operations(keyring: LocalKeyring, home: Path) -> None:
    with Guard.from_env({"KMSGUARD_HOME": str(home)}) as guard:
        guard.encrypt(b"x", "pii", {"user": "1"})
        metrics = of(guard.observers)
        assert isinstance(metrics, Metrics)
        text = metrics.exposition().decode()
    assert 'kmsguard_operations_total{classification="pii",operation="encrypt",outcome="ok"} 1.0' in text
    assert (
        'kmsguard_operation_duration_seconds_count{classification="pii",operation="encrypt",outcome="ok"} 1.0' in text
    )


def test_a_killed_deliverer_is_replaced_and_loses_nothing(keyring: LocalKeyring, home: Path) -> None:
    write_config(home, {"flush_interval": 0.05})
    with Guard.from_env({"KMSGUARD_HOME": str(home)}) as guard:
        obs = observer_of(guard)
        for i in range(20):
            guard.encrypt(b"x", "general", {"i": str(i)})
        assert obs.flush()
        assert obs._child is not None
        first = obs._child
        first.kill()
        for i in range(20):
            guard.encrypt(b"x", "general", {"i": str(i)})
        assert obs.flush(timeout=30)
        assert obs._child is not first
    records = records_of(home)
    assert [r.seq for r in records] == list(range(1, 42))
    assert verify_home(home).intact


def test_a_full_spool_drops_non_strict_records_and_refuses_strict_ones(keyring: LocalKeyring, home: Path) -> None:
    """When the sink is down: nothing to wait for (see the next test for a sink that is up)."""
    write_config(home, {"flush_interval": 60, "max_spool_mb": 1, "sink": "postgres", "dsn": SINK_DOWN})
    with Guard.from_env({"KMSGUARD_HOME": str(home)}) as guard:
        obs = observer_of(guard)
        big = {"note": "n" * 7_000}  # ~7 KB of context per record: the 1 MiB spool fills fast
        for i in range(200):  # a new context each time: full records, not compact hits
            guard.encrypt(b"x", "general", {**big, "i": str(i)})
        assert obs.dropped > 0
        dropped = obs.dropped
        obs._spool.frames.limit = obs._spool.frames.written  # not a byte more, not even for a small record
        for _ in range(5):  # the first two are full records, then compact hits: all dropped
            guard.encrypt(b"x", "general", {"small": "context"})
        assert obs.dropped == dropped + 5
        with pytest.raises(AuditUnavailable):
            guard.encrypt(b"x", "payment", {"purpose": "p", **big})
        # Measured in whole segments: each one's unused tail (less than a record) counts too.
        assert obs.spool_bytes <= (1 << 20) + 4 * 8_000
        assert not obs.sink_healthy
        obs.close(timeout=0.5)  # the sink stays down: what is spooled stays there


@pytest.mark.parametrize("delivery", ["process", "thread"])
def test_a_caller_that_outruns_a_working_sink_waits_for_room_and_loses_nothing(
    keyring: LocalKeyring, home: Path, delivery: str
) -> None:
    """A 1 MiB spool and ~40x that in records: the callers slow to the sink's pace instead of dropping."""
    write_config(home, {"flush_interval": 60, "max_spool_mb": 1, "delivery": delivery})
    big = {"note": "n" * 7_000}
    with Guard.from_env({"KMSGUARD_HOME": str(home)}) as guard:
        obs = observer_of(guard)
        for i in range(3_000):  # full records (a new context each), then strict ones, then cache hits
            guard.encrypt(b"x", "general", {**big, "i": str(i)})
        for i in range(300):
            guard.encrypt(b"x", "payment", {**big, "purpose": str(i)})
        for _ in range(60_000):
            guard.encrypt(b"x", "general", {"tenant": "t"})
        assert obs.dropped == 0
    records = records_of(home)
    assert len(records) == 3_000 + 300 + 60_000 + 1 and [r.seq for r in records] == list(range(1, len(records) + 1))
    assert verify_home(home).intact


def test_audit_files_are_private(keyring: LocalKeyring, home: Path) -> None:
    with Guard.from_env({"KMSGUARD_HOME": str(home), "KMSGUARD_AUDIT_DELIVERY": "thread"}) as guard:
        guard.encrypt(b"x", "general")
        assert observer_of(guard).flush()
        spool = home / "audit-spool"
        assert spool.stat().st_mode & 0o077 == 0
        assert all(p.stat().st_mode & 0o077 == 0 for p in spool.iterdir())
        for name in ("audit.db", "audit.db-wal", "audit.db-shm"):  # all exist while the writer has the db open
            assert (home / name).stat().st_mode & 0o077 == 0, name


def test_a_front_end_names_the_caller(keyring: LocalKeyring, home: Path) -> None:
    from kmsguard.operation import acting_as

    with Guard.from_env({"KMSGUARD_HOME": str(home), "KMSGUARD_PRINCIPAL": "booking-api"}) as guard:
        with acting_as("agent-7@airline"):
            guard.encrypt(b"x", "pii", {"passenger": "42"})
        guard.encrypt(b"x", "pii", {"passenger": "43"})
    first, second, _close = records_of(home)
    assert (first.principal, second.principal) == ("agent-7@airline", "booking-api")


def test_a_forked_child_records_through_a_writer_of_its_own(
    keyring: LocalKeyring, home: Path, fresh_python: Callable[[str], str]
) -> None:
    """The child's records go to its own spool and chain, never into its parent's."""
    write_config(home, {"delivery": "thread"})
    fresh_python(f"""
        import os
        from kmsguard import Guard
        from kmsguard.audit import AuditObserver

        with Guard.from_env({{"KMSGUARD_HOME": {str(home)!r}}}) as guard:
            for _ in range(3):
                guard.encrypt(b"x", "general")  # the third is a compact hit
            with fork_with_threads():  # a user's fork, with the Guard's threads running
                pid = os.fork()
            if pid == 0:  # the child: a hit and a full record, through the Guard it inherited
                try:
                    guard.encrypt(b"x", "general")  # a hit frame
                    guard.encrypt(b"x", "general", {{"new": "kind"}})  # a full record
                    observer = next(o for o in guard.observers if isinstance(o, AuditObserver))
                    guard.close()
                    code = 0 if observer.dropped == 0 and observer._next.dropped == 0 else 1
                except BaseException:
                    code = 2
                os._exit(code)
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0
            guard.encrypt(b"x", "general")
    """)
    records = records_of(home)
    by_writer: dict[str, list[int]] = {}
    for r in records:
        by_writer.setdefault(r.writer_id, []).append(r.seq)
    assert sorted(by_writer.values()) == [[1, 2, 3], [1, 2, 3, 4, 5]] and verify_home(home).intact
    assert sum(r.operation == "writer-closed" for r in records) == 2


def test_a_forked_child_numbers_its_requests_apart_from_its_parent(fresh_python: Callable[[str], str]) -> None:
    """Both continue the same counter; the child's own prefix keeps their request ids distinct."""
    parent, child = fresh_python("""
        import os
        from kmsguard.operation import request_id_of

        read, write = os.pipe()
        pid = os.fork()  # before any thread starts
        if pid == 0:
            try:
                os.write(write, request_id_of(7).encode())
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        print(request_id_of(7), os.read(read, 100).decode())
    """).split()
    assert child.endswith("0000000007") and child != parent
