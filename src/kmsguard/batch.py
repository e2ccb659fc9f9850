"""Batches: one result per item, in order, and one bad item never fails the others.

``Guard.encrypt_many`` and ``Guard.decrypt_many`` return a list of :class:`Result`, like
JavaScript's ``Promise.allSettled``: each holds either a value or the kmsguard error that
item raised. Each item is still its own audited operation.

Work is spread over at most ``max_concurrency`` threads, each taking every n-th item, so
that items needing a KMS call (a cache miss, a distinct data key) wait for the key
service in parallel, while items served from memory cost no thread hand-off each.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

from kmsguard import operation
from kmsguard.datakey import DataKey, WrappedKey
from kmsguard.errors import KmsGuardError
from kmsguard.keyrings.base import KeyRequest, Loan

T = TypeVar("T")
I = TypeVar("I")  # noqa: E741

#: Threads a batch uses by default: enough to overlap KMS round trips, few enough for a laptop.
DEFAULT_CONCURRENCY = 8


@dataclass(frozen=True, slots=True)
class Result(Generic[T]):
    """One item's outcome: ``value`` when ``ok``, else ``error`` (a kmsguard error)."""

    value: T | None = None
    error: KmsGuardError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def get(self) -> T:
        """The value, or raise the item's error."""
        if self.error is not None:
            raise self.error
        return self.value  # type: ignore[return-value]


def settle(run: Callable[[I], T], items: Sequence[I], max_concurrency: int) -> list[Result[T]]:
    """``run`` each item, catching its kmsguard error; results in the items' order."""
    if max_concurrency < 1:
        raise ValueError("max_concurrency must be at least 1")
    results: list[Result[T]] = [Result()] * len(items)

    def lane(start: int, step: int) -> None:
        for i in range(start, len(items), step):
            try:
                results[i] = Result(value=run(items[i]))
            except KmsGuardError as exc:
                results[i] = Result(error=exc)

    workers = min(max_concurrency, len(items))
    if workers <= 1:
        lane(0, 1)
        return results
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kmsguard-batch") as pool:
        # Each thread in a copy of the caller's context: the operations run for the same
        # principal (operation.acting_as) and request (operation.serving) as the caller's.
        for future in [pool.submit(contextvars.copy_context().run, lane, w, workers) for w in range(workers)]:
            future.result()
    return results


class UnwrapOnce:
    """A batch's unwrap: each distinct (wrapped keys, bound context) reaches the keyring once.

    The first item that needs a data key unwraps it (inside its own operation, so the
    audit record shows the KMS call); items of the same group wait for it and reuse the
    key, or get the same error, without another call. A retryable failure (throttled,
    timed out) is shared only after ``RETRYABLE_ATTEMPTS`` items of the group tried, so one
    throttled call does not fail a whole group. Lives only as long as the batch.
    ``unwrap`` is Guard's (a data-key cache's ``lend_unwrapped``): the item that unwrapped
    gets the key's Budget, so its plan keeps the key for the cache hits of later decrypts.
    """

    RETRYABLE_ATTEMPTS = 3

    def __init__(self, unwrap: Callable[[Sequence[WrappedKey], KeyRequest], Loan]) -> None:
        self._unwrap = unwrap
        self._lock = threading.Lock()
        self._slots: dict[Hashable, _Slot] = {}

    def __call__(self, wrapped: Sequence[WrappedKey], request: KeyRequest) -> Loan:
        """The data key, with its Budget (a data-key cache's) for the item that unwrapped it only."""
        key = (tuple(wrapped), request.partition)
        with self._lock:
            slot = self._slots.setdefault(key, _Slot())
        with slot.lock:
            if slot.data_key is None and slot.error is None:
                try:
                    slot.data_key, budget = self._unwrap(wrapped, request)
                except KmsGuardError as exc:
                    slot.attempts += 1
                    if not exc.retryable or slot.attempts >= self.RETRYABLE_ATTEMPTS:
                        slot.error = exc
                    raise
                return slot.data_key, budget
        if slot.error is not None:
            raise slot.error
        operation.note_cache(True)
        assert slot.data_key is not None
        return slot.data_key, None


class _Slot:
    __slots__ = ("attempts", "data_key", "error", "lock")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.attempts = 0
        self.data_key: DataKey | None = None
        self.error: KmsGuardError | None = None
