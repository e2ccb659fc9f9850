"""One audit writer per process and destination, shared by every Guard of the process.

A Guard is cheap to make: ``build_observer`` hands every Guard whose settings name the
same spool, sink and audit options the one writer this process already has for them
(one spool, one chain, one deliverer, started on the first record), and counts it as
one more user. ``Guard.close()`` gives up one use (the last closes the writer); a Guard
dropped without ``close()`` costs nothing more, and the writer is stopped at interpreter
exit (see AuditObserver._at_exit), which waits on no network.

After ``os.fork()`` the child starts with an empty registry: the writers it inherited
are its parent's, and each hands the child's records to the child's own writer, made
from the same recipe on first use (AuditObserver._successor).
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable, Hashable
from pathlib import Path

from kmsguard.audit.writer import AuditObserver

_lock = threading.Lock()
_writers: dict[Hashable, AuditObserver] = {}


def shared_writer(key: Hashable, make: Callable[[], AuditObserver]) -> AuditObserver:
    """This process's open writer for ``key`` with one more user, or a new one from ``make``."""
    with _lock:
        writer = _writers.get(key)
        if writer is not None:
            with writer._users_lock:
                if not writer.closed:
                    writer.users += 1
                    return writer
        writer = make()
        writer.rebuild = functools.partial(shared_writer, key, make)
        _writers[key] = writer
        return writer


def writers_under(directory: Path) -> list[AuditObserver]:
    """The open writers of this process whose spool is in ``directory`` (for the test kit)."""
    with _lock:
        found = list(_writers.values())
    return [w for w in found if not w.closed and w.spool_dir.is_relative_to(directory)]


def close_all(directory: Path, timeout: float | None = None) -> None:
    """Close every open writer spooling under ``directory``, whatever number of Guards still use it."""
    for writer in writers_under(directory):
        with writer._users_lock:
            writer.users = 1
        writer.close(timeout)


def _forget_in_child() -> None:
    global _lock
    _lock = threading.Lock()
    _writers.clear()


os.register_at_fork(after_in_child=_forget_in_child)
