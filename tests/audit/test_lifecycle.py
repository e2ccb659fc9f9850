"""The audit writer's life in a process: shared by Guards, started lazily, across fork, at close."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from kmsguard import Guard
from kmsguard.audit import AuditObserver, AuditSettings
from kmsguard.config import load_settings
from kmsguard.errors import ConfigurationError
from kmsguard.keyrings.local import LocalKeyring

from .conftest import records_of, verify_home, write_config


def observer_of(guard: Guard) -> AuditObserver:
    return next(o for o in guard.observers if isinstance(o, AuditObserver))


def test_guards_of_a_process_share_one_writer_that_starts_on_the_first_record(
    keyring: LocalKeyring, home: Path
) -> None:
    write_config(home, {"delivery": "process", "close_timeout": 60})
    first, second = Guard.from_env({"KMSGUARD_HOME": str(home)}), Guard.from_env({"KMSGUARD_HOME": str(home)})
    writer = observer_of(first)
    assert observer_of(second) is writer
    assert writer._child is None and writer._thread is None  # making Guards started no process
    second.encrypt(b"x", "general")
    assert writer._child is not None
    second.close()
    second.close()  # once per Guard: the writer still serves the first
    assert not writer.closed
    first.encrypt(b"y", "general", {"k": "v"})
    first.close()
    assert writer.closed and writer._child.returncode == 0
    assert [r.operation for r in records_of(home)] == ["encrypt", "encrypt", "writer-closed"]
    assert list((home / "audit-spool").iterdir()) == []


def test_a_writer_that_recorded_nothing_leaves_no_file(keyring: LocalKeyring, home: Path) -> None:
    with Guard.from_env({"KMSGUARD_HOME": str(home)}) as guard:
        assert observer_of(guard)._child is None
    assert list((home / "audit-spool").iterdir()) == []


@pytest.mark.parametrize("value", [-1, "soon", 601])
def test_close_timeout_is_validated(keyring: LocalKeyring, home: Path, value: object) -> None:
    write_config(home, {"close_timeout": value})
    with pytest.raises(ConfigurationError, match=r"audit\.close_timeout"):
        AuditSettings.of(load_settings({"KMSGUARD_HOME": str(home)}))


def test_close_does_not_wait_on_a_sink_that_is_down(keyring: LocalKeyring, home: Path) -> None:
    """close_timeout is generous here; a failing delivery ends the wait at once, records stay spooled."""
    write_config(home, {"sink": "postgres", "dsn": "postgresql://postgres@127.0.0.1:1/nowhere", "connect_timeout": 1,
                        "delivery": "thread", "close_timeout": 600})
    guard = Guard.from_env({"KMSGUARD_HOME": str(home)})
    guard.encrypt(b"x", "general")
    writer = observer_of(guard)
    assert not writer.flush(timeout=60, until_failing=True) and writer.blocked_on == "sink"
    guard.close()
    assert writer.closed and any((home / "audit-spool").glob("*.spool"))


def test_a_thousand_dropped_guards_share_one_deliverer(
    keyring: LocalKeyring, home: Path, fresh_python: Callable[[str], str]
) -> None:
    """Made and dropped without close(): one deliverer process, bounded threads and descriptors."""
    write_config(home, {"delivery": "process", "close_timeout": 120})
    out = fresh_python(f"""
        import gc, os, threading
        from kmsguard import Guard
        from kmsguard.audit import AuditObserver

        def children():
            me, n = str(os.getpid()), 0
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    with open(f"/proc/{{pid}}/stat") as fh:
                        n += fh.read().rsplit(")", 1)[1].split()[1] == me
                except OSError:
                    pass
            return n

        env = {{"KMSGUARD_HOME": {str(home)!r}}}
        peak = [0, 0, 0]
        for i in range(1000):
            guard = Guard.from_env(env)
            guard.encrypt(b"x", "general", {{"i": str(i % 7)}})
            del guard
            if i % 50 == 49:
                gc.collect()
                sample = (children(), threading.active_count(), len(os.listdir("/proc/self/fd")))
                peak = [max(p, s) for p, s in zip(peak, sample)]
        with Guard.from_env(env) as guard:
            writer = next(o for o in guard.observers if isinstance(o, AuditObserver))
            assert writer.flush(120) and writer.dropped == 0
        print(*peak)
    """)
    processes, threads, fds = map(int, out.split())
    assert processes == 1
    assert threads <= 6  # main, spare maker, timer, deliverer's reader
    assert fds <= 20
    records = records_of(home)
    assert Counter(r.operation for r in records) == {"encrypt": 1000, "writer-closed": 1}
    assert verify_home(home).intact


SCENARIO_FORK = """
import os, sys
from kmsguard import Guard
from kmsguard.audit import AuditObserver

guard = Guard.from_env()
writer = next(o for o in guard.observers if isinstance(o, AuditObserver))
guard.encrypt(b"parent", "general")
children = []
for n in range(4):
    with fork_with_threads():
        pid = os.fork()
    if pid == 0:
        code = 0
        try:
            sealed = guard.encrypt(b"child", "general", {"child": str(n)})
            guard.decrypt(sealed, {"child": str(n)})
            for _ in range(3):
                guard.encrypt(b"hit", "general")  # hits through the HitWriter the plans hold
            guard.encrypt(b"card", "payment", {"purpose": "refund"})  # strict: synced to the child's spool
            if writer.dropped or writer._next is None or writer._next.dropped:
                code = 3
        except BaseException as exc:
            print(type(exc).__name__, exc, file=sys.stderr)
            code = 2
        os._exit(code)  # as multiprocessing's workers end: no close, no atexit
    children.append(pid)
for pid in children:
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, status
guard.encrypt(b"parent again", "general")
guard.close()  # the last pass also delivers the spools the children left
assert writer.dropped == 0
"""


def fork_counts(records: list) -> Counter[str]:  # type: ignore[type-arg]
    return Counter(r.operation for r in records)


def test_every_operation_of_a_parent_and_four_forked_children_is_recorded(
    keyring: LocalKeyring, home: Path, fresh_python: Callable[[str], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    write_config(home, {"delivery": "process", "close_timeout": 120})
    fresh_python(SCENARIO_FORK)
    records = records_of(home)
    writers = Counter(r.writer_id for r in records)
    assert len(writers) == 5
    # parent: 2 encrypts and its writer-closed; each child: 5 encrypts and a decrypt (no close: os._exit)
    assert fork_counts(records) == {"encrypt": 2 + 4 * 5, "decrypt": 4, "writer-closed": 1}
    payments = [r for r in records if r.classification == "payment"]
    assert len(payments) == 4 and all(r.outcome == "ok" for r in payments)
    assert verify_home(home).intact


@pytest.mark.parametrize(("flags", "env", "shown"), [([], {}, False), (["-v"], {}, True),
                                                     ([], {"KMSGUARD_LOG_LEVEL": "warning"}, True)])
def test_the_cli_shows_warnings_only_when_asked(
    keyring: LocalKeyring, home: Path, flags: list[str], env: dict[str, str], shown: bool
) -> None:
    """A sink that is down: the command succeeds (its record is spooled), and says so only if asked."""
    write_config(home, {"sink": "postgres", "dsn": "postgresql://postgres@127.0.0.1:1/nowhere", "connect_timeout": 1})
    proc = subprocess.run(
        [sys.executable, "-m", "kmsguard", *flags, "encrypt", "--class", "general"],
        input=b"x",
        capture_output=True,
        env={**os.environ, **env},
        timeout=120,
    )
    assert proc.returncode == 0 and proc.stdout
    lines = proc.stderr.decode().splitlines()
    if shown:
        assert lines[0].startswith("kmsguard: WARNING: audit sink postgres unavailable, spooling locally")
        assert lines[-1].startswith("kmsguard: WARNING: audit: 2 record(s) wait in the spool") and len(lines) == 2
    else:
        assert lines == []


def test_a_log_level_that_is_not_one_is_a_usage_error(home: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "kmsguard", "inspect"],
        input=b"x",
        capture_output=True,
        env={**os.environ, "KMSGUARD_LOG_LEVEL": "chatty"},
        timeout=120,
    )
    assert proc.returncode == 2 and b"KMSGUARD_LOG_LEVEL" in proc.stderr
