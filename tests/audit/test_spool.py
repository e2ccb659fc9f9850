"""The spool's segments: the next one is prepared ahead, and every file is cleaned up by whoever owns it."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from kmsguard.audit.facts import Spooled
from kmsguard.audit.frames import NOT_WRITTEN
from kmsguard.audit.spool import SegmentReader, Spool, SpoolFull, remove_writer, segment_path, spare_path, try_lock

SEGMENT = 64 << 10
FACTS = Spooled(1.0, "encrypt", "general", ("local:general:v1",), (), "p", "ok", None, 0.001, 0, True, 1024, "r", ())


def wait_for(path: Path) -> None:
    deadline = time.monotonic() + 10
    while not path.exists():
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.01)


def fill(spool: Spool, segments: int) -> int:
    """Append until ``segments`` more segments were started, checking each is the spare renamed.

    Returns how many records that took."""
    n, target = 0, spool.segment + segments
    while spool.segment < target:
        spare = spare_path(spool.directory, spool.writer_id)
        wait_for(spare)
        deadline = time.monotonic() + 10
        while spool._spare is None:  # the file exists before it is filled and handed over
            assert time.monotonic() < deadline
            time.sleep(0.01)
        inode, current = spare.stat().st_ino, spool.segment
        while spool.segment == current:
            spool.append(FACTS, durable=False)
            n += 1
        assert segment_path(spool.directory, spool.writer_id, spool.segment).stat().st_ino == inode
    return n


def test_a_full_segment_rotates_into_the_spare_prepared_ahead(tmp_path: Path) -> None:
    spool = Spool(tmp_path, "w", 1 << 30, segment_bytes=SEGMENT)
    count = fill(spool, 3)
    spool.sync()
    assert spool.segment == 4
    reader = SegmentReader(tmp_path, "w")
    seqs: list[int] = []
    while True:
        entries, used = reader.read(1 << 20, writer_alive=True)
        if not entries:
            break
        seqs += [seq for seq, _ in entries]
        reader.advance(used)
    assert seqs == list(range(1, count + 1))
    spool.close()
    assert not spare_path(tmp_path, "w").exists()


def test_a_forked_child_leaves_its_parents_spare_alone(tmp_path: Path, fresh_python: Callable[[str], str]) -> None:
    fresh_python(f"""
        import os
        from pathlib import Path
        from audit.test_spool import SEGMENT, fill, wait_for
        from kmsguard.audit.spool import Spool, spare_path

        spool = Spool(Path({str(tmp_path)!r}), "w", 1 << 30, segment_bytes=SEGMENT)
        wait_for(spare_path(spool.directory, "w"))
        with fork_with_threads():  # the spare is made by a thread of the spool's own
            pid = os.fork()
        if pid == 0:
            try:
                spool.close()  # as an inherited Guard's atexit would
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        assert spare_path(spool.directory, "w").exists()
        fill(spool, 1)  # the parent still rotates into it
        spool.close()
    """)


def test_a_child_forked_while_a_thread_appends_neither_hangs_nor_writes(
    tmp_path: Path, fresh_python: Callable[[str], str]
) -> None:
    """The parent's thread held the spool's lock at the fork: the child's copy of it is
    never released by anyone, so the child's spool must not wait for it."""
    fresh_python(f"""
        import os, threading, time
        from pathlib import Path
        from audit.test_spool import FACTS, SEGMENT
        from kmsguard.audit.spool import Spool
        from kmsguard.errors import AuditUnavailable

        spool = Spool(Path({str(tmp_path)!r}), "w", 1 << 30, segment_bytes=SEGMENT)
        spool.append(FACTS, durable=False)
        held, release = threading.Event(), threading.Event()

        def append_slowly() -> None:
            with spool._lock:  # as an append in progress
                held.set()
                release.wait()

        appender = threading.Thread(target=append_slowly)
        appender.start()
        held.wait()
        with fork_with_threads():
            pid = os.fork()
        if pid == 0:
            code = 1
            try:
                try:
                    spool.append(FACTS, durable=False)
                except AuditUnavailable:
                    spool.close()  # as an inherited Guard's atexit would
                    code = 0
            finally:
                os._exit(code)
        release.set()
        appender.join()
        deadline = time.monotonic() + 30
        while (ended := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        if ended[0] == 0:
            os.kill(pid, 9)
            raise SystemExit("the forked child hung on its inherited spool")
        assert os.waitstatus_to_exitcode(ended[1]) == 0, "the child's spool did not refuse"
        assert spool.append(FACTS, durable=False) == 2  # the parent's spool carries on
        spool.close()
    """)


def test_a_dead_writers_spare_is_removed_with_its_spool(tmp_path: Path, fresh_python: Callable[[str], str]) -> None:
    # A writer that dies without closing: lock, segment and spare stay behind.
    fresh_python(f"""
        import os
        from pathlib import Path
        from audit.test_spool import SEGMENT, wait_for
        from kmsguard.audit.spool import Spool, spare_path

        Spool(Path({str(tmp_path)!r}), "dead", 1 << 30, segment_bytes=SEGMENT)
        wait_for(spare_path(Path({str(tmp_path)!r}), "dead"))
        os._exit(0)
    """)
    assert spare_path(tmp_path, "dead").exists()
    lock = try_lock(tmp_path, "dead")
    assert lock is not None
    remove_writer(tmp_path, "dead", lock)
    assert list(tmp_path.iterdir()) == []


def test_a_full_spool_refuses_hits_and_records_by_name(tmp_path: Path) -> None:
    """What Frames.hit cannot write, Spool.hit writes or refuses with SpoolFull (never an integer code)."""
    spool = Spool(tmp_path, "w", 64 << 10, segment_bytes=SEGMENT)
    shape = ("encrypt", "general", (), (), "p", "ok", None, 0, True, ())
    written = 0
    with pytest.raises(SpoolFull):
        while True:
            spool.hit(1, shape, "r", 1, 2, 3, 4)
            written += 1
    assert written > 1000 and spool.frames.hit(1, 1, 2, 3, 4) == NOT_WRITTEN
    with pytest.raises(SpoolFull):
        spool.append(FACTS, durable=False)
    spool.close()
