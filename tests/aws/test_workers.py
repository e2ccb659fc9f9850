"""The daemon worker pool behind deadline-bounded KMS calls."""

from __future__ import annotations

import threading

import pytest

from kmsguard.aws.workers import DaemonWorkers


def test_results_exceptions_and_thread_reuse() -> None:
    workers = DaemonWorkers(limit=4)
    names = {workers.submit(lambda: threading.current_thread().name).result(timeout=5) for _ in range(20)}
    assert len(names) == 1  # sequential calls reuse the one idle thread
    with pytest.raises(ZeroDivisionError):
        workers.submit(lambda: 1 / 0).result(timeout=5)
    assert workers.submit(lambda: threading.current_thread().daemon).result(timeout=5) is True
    workers.close()
    with pytest.raises(RuntimeError):
        workers.submit(lambda: None)


def test_never_more_threads_than_the_limit_and_queued_calls_still_run() -> None:
    workers = DaemonWorkers(limit=2)
    release = threading.Event()
    blocked = [workers.submit(lambda: release.wait(10) and threading.current_thread().name) for _ in range(5)]
    release.set()
    names = {f.result(timeout=10) for f in blocked}
    assert len(names) <= 2 and all(names)
    workers.close()
