"""Daemon worker threads that run KMS calls for callers who wait only until their deadline.

Why not ``concurrent.futures.ThreadPoolExecutor``: its threads are joined when the
interpreter exits. A call abandoned at its deadline can sit in a stalled read until
botocore's read timeout (30 s in production), and a command-line run that already
reported KMS_TIMEOUT would then hang on exit for that long. These threads are daemons,
so an abandoned call never holds the process up.

At most ``limit`` threads are started, on demand; each is reused. A call submitted
when all are busy waits in the queue (its caller's deadline still bounds the wait).
"""

from __future__ import annotations

import queue
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

R = TypeVar("R")


class DaemonWorkers:
    """A small on-demand pool of daemon threads. Thread-safe."""

    def __init__(self, limit: int, name: str = "kmsguard-kms") -> None:
        self._limit = max(1, limit)
        self._name = name
        self._tasks: queue.SimpleQueue[tuple[Future[Any], Callable[[], Any]] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        self._started = [0]  # shared with the finalizer: how many threads to stop
        self._idle = 0  # started threads waiting for work that no submit has claimed
        self._closed = False
        # Threads hold the queue and a weak reference to the pool, never the pool: a pool
        # dropped without close() (a Guard never closed) stops its threads when collected.
        weakref.finalize(self, _stop_threads, self._tasks, self._started)

    def submit(self, fn: Callable[[], R]) -> Future[R]:
        """Run ``fn`` on a worker; the future holds its result or exception."""
        future: Future[R] = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("the KMS workers are closed")
            if self._idle:
                self._idle -= 1
            elif self._threads < self._limit:
                self._threads += 1
                self._started[0] = self._threads
                name = f"{self._name}-{self._threads}"
                threading.Thread(target=_serve, args=(self._tasks, weakref.ref(self)), name=name, daemon=True).start()
            self._tasks.put((future, fn))
        return future

    def _ready(self) -> None:
        with self._lock:
            self._idle += 1

    def close(self) -> None:
        """Let every thread finish its current call and stop; queued calls are cancelled."""
        with self._lock:
            self._closed = True
            threads = self._threads
        while True:
            try:
                task = self._tasks.get_nowait()
            except queue.Empty:
                break
            if task is not None:
                task[0].cancel()
        for _ in range(threads):
            self._tasks.put(None)
        self._started[0] = 0


Task = tuple[Future[Any], Callable[[], Any]]


def _serve(tasks: queue.SimpleQueue[Task | None], pool_ref: weakref.ref[DaemonWorkers]) -> None:
    """A worker thread: run tasks until a None (the pool closed or was collected)."""
    while True:
        task = tasks.get()
        if task is None:
            return
        future, fn = task
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)
        del task, future, fn  # nothing of the caller's outlives its call here
        pool = pool_ref()
        if pool is not None:
            pool._ready()
            del pool


def _stop_threads(tasks: queue.SimpleQueue[Task | None], started: list[int]) -> None:
    for _ in range(started[0]):
        tasks.put(None)
