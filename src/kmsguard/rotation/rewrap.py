"""Rewrap: move stored envelopes onto their classification's current key, body untouched.

A value is *current* when its header's key references are exactly those a new envelope
of its classification gets now (learned once per classification by sealing an empty
probe, so local versions and AWS key ARNs are handled alike); anything else is passed to
``Guard.rewrap``, which authenticates the envelope before replacing its wrapped keys.

Values that share a data key (the same wrapped-keys section, common when the cache was
on) cost one unwrap and one rewrap per batch, not per row: the Guard used here sits on
:class:`BatchKeys`, which answers a repeated request from what the batch already got.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Sequence
from typing import Any

from kmsguard import envelope, operation
from kmsguard.config import Settings
from kmsguard.datakey import DataKey, WrappedKey
from kmsguard.errors import InvalidCiphertext, KmsGuardError, UnknownClassification
from kmsguard.guard import Guard
from kmsguard.keyrings.base import KeyLender, KeyRequest, Keyring, Loan
from kmsguard.rotation.census import Group, skim
from kmsguard.rotation.sources import Value
from kmsguard.rotation.tables import BatchResult

#: A row as a batch sees it: (row key, stored value, the row's context columns).
Row = tuple[Any, Value, dict[str, str]]
#: What a batch wants written: (row key, the value read, the new value).
Change = tuple[Any, Value, Value]

PROBE_CONTEXT_VALUE = "kmsguard-probe"


class KeyCalls:
    """A keyring that counts the requests reaching the one behind it (the backend: local or KMS).

    Sits under the data-key cache, so ``calls`` is what the key service was asked, not
    what the cache answered. Read and reset by the batch that owns it.
    """

    def __init__(self, inner: Keyring) -> None:
        self.inner = inner
        self._lock = threading.Lock()
        self.calls = 0

    def take(self) -> int:
        """The calls since the last ``take()``."""
        with self._lock:
            calls, self.calls = self.calls, 0
            return calls

    def _count(self) -> None:
        with self._lock:
            self.calls += 1

    def generate(self, request: KeyRequest) -> DataKey:
        self._count()
        return self.inner.generate(request)

    def wrap(self, data_key: DataKey, request: KeyRequest) -> DataKey:
        self._count()
        return self.inner.wrap(data_key, request)

    def unwrap(self, wrapped: Sequence[WrappedKey], request: KeyRequest) -> DataKey:
        self._count()
        return self.inner.unwrap(wrapped, request)

    def rewrap(self, wrapped: Sequence[WrappedKey], request: KeyRequest) -> tuple[WrappedKey, ...]:
        self._count()
        return self.inner.rewrap(wrapped, request)

    def close(self) -> None:
        closer = getattr(self.inner, "close", None)
        if callable(closer):
            closer()


class BatchKeys:
    """A keyring in front of another that serves each distinct unwrap/rewrap once per batch.

    ``new_batch()`` forgets what the previous batch got; ``counter`` (a :class:`KeyCalls`
    under the data-key cache) tells what the batch cost. A non-retryable failure is
    remembered too, so a group of values under a refused key costs one call.
    """

    def __init__(self, inner: KeyLender, counter: KeyCalls) -> None:
        self.inner = inner
        self.counter = counter
        self._lock = threading.Lock()
        self._memo: dict[Hashable, Any] = {}

    def new_batch(self) -> None:
        with self._lock:
            self._memo.clear()

    def generate(self, request: KeyRequest) -> DataKey:
        return self.inner.generate(request)

    def lend(self, request: KeyRequest, size: int) -> Loan:
        """Encrypts (migrate) borrow from the cache below as Guard would, so its limits hold."""
        return self.inner.lend(request, size)

    def lend_unwrapped(self, wrapped: Sequence[WrappedKey], request: KeyRequest) -> Loan:
        return self.unwrap(wrapped, request), None

    def clear(self) -> None:
        self.inner.clear()

    def wrap(self, data_key: DataKey, request: KeyRequest) -> DataKey:
        return self.inner.wrap(data_key, request)

    def unwrap(self, wrapped: Sequence[WrappedKey], request: KeyRequest) -> DataKey:
        result: DataKey = self._once("unwrap", wrapped, request, self.inner.unwrap)
        return result

    def rewrap(self, wrapped: Sequence[WrappedKey], request: KeyRequest) -> tuple[WrappedKey, ...]:
        result: tuple[WrappedKey, ...] = self._once("rewrap", wrapped, request, self.inner.rewrap)
        return result

    def _once(self, kind: str, wrapped: Sequence[WrappedKey], request: KeyRequest, call: Callable[..., Any]) -> Any:
        key = (kind, tuple(wrapped), request.partition)
        with self._lock:
            known = self._memo.get(key)
        if known is not None:
            if isinstance(known, KmsGuardError):
                raise known
            operation.note_cache(True)
            return known
        try:
            result = call(wrapped, request)
        except KmsGuardError as exc:
            if not exc.retryable:
                with self._lock:
                    self._memo[key] = exc
            raise
        with self._lock:
            self._memo[key] = result
        return result

    def close(self) -> None:
        closer = getattr(self.inner, "close", None)
        if callable(closer):
            closer()


def batch_guard(settings: Settings) -> tuple[Guard, BatchKeys]:
    """A Guard over the configured stack with :class:`BatchKeys` on top and :class:`KeyCalls`
    under the data-key cache, and that BatchKeys."""
    from kmsguard.keyrings.caching import CachingKeyring
    from kmsguard.stack import backend_keyring, build_observers, build_policy, build_telemetry

    telemetry = build_telemetry(settings)
    backend = backend_keyring(settings, telemetry)
    counter = KeyCalls(backend)
    keyring = CachingKeyring(counter, settings.policy, telemetry=telemetry)
    keys = BatchKeys(keyring, counter)
    # The audit trail gets its key from the backend itself: the local keyring's secret store
    # (which the counter would hide), and no call of its own counted as the job's.
    observers = build_observers(settings, backend, telemetry)
    guard = Guard(build_policy(settings), keys, observers=observers, principal=settings.principal, settings=settings)
    return guard, keys


class Rewrap:
    """What one batch of a rewrap does; ``classification`` limits it to one class."""

    kind = "rewrap"

    def __init__(self, guard: Guard, keys: BatchKeys, classification: str | None = None) -> None:
        self.guard = guard
        self.keys = keys
        self.classification = classification
        self._current: dict[str, tuple[str, ...] | KmsGuardError] = {}
        if classification is not None:
            guard.policy.get(classification)  # an unknown class is a usage error, now

    def options(self) -> str:
        return self.classification or ""

    def columns(self) -> list[str]:
        return []

    def current_refs(self, classification: str) -> tuple[str, ...]:
        """The key references a new envelope of ``classification`` gets now (one probe per class)."""
        known = self._current.get(classification)
        if known is None:
            try:
                cls = self.guard.policy.get(classification)
                probe = self.guard.encrypt(
                    b"", classification, dict.fromkeys(cls.required_context, PROBE_CONTEXT_VALUE)
                )
                known = tuple(sorted(k["key_ref"] for k in self.guard.inspect(probe).keys))
            except KmsGuardError as exc:
                known = exc
            self._current[classification] = known
        if isinstance(known, KmsGuardError):
            raise known
        return known

    def wants(self, value: Value) -> bool | None:
        """True: not current, to rewrap; False: nothing to do; None: not an envelope. Headers only."""
        group = skim(value)
        return None if group is None else self._wants(group)

    def _wants(self, group: Group) -> bool:
        cls = group[0].decode("ascii", "replace")
        if self.classification is not None and cls != self.classification:
            return False
        try:
            return tuple(sorted(r.decode("ascii", "replace") for r in group[1])) != self.current_refs(cls)
        except UnknownClassification:
            return True  # Guard.rewrap refuses it, and the failure is recorded

    def apply(self, rows: Sequence[Row]) -> tuple[list[Change], BatchResult]:
        self.keys.new_batch()
        result = BatchResult(rows=len(rows))
        changes: list[Change] = []
        for key, value, _ in rows:
            try:
                group = skim(value)
                if group is None:
                    raise InvalidCiphertext()
                if not self._wants(group):
                    result.current += 1
                    continue
                changes.append((key, value, self._rewrap(value, group[0].decode("ascii", "replace"))))
            except KmsGuardError as exc:
                result.fail(key, exc)
        result.key_calls = self.keys.counter.take()
        return changes, result

    def _rewrap(self, value: Value, classification: str) -> Value:
        """The rewrapped value in the form it was stored: text, binary, or text kept in a binary column.

        A classification that requires context at decrypt (payment's ``purpose``) gets the
        header's own: rewrap reveals nothing, and the bound context stays as it was.
        """
        raw = value if isinstance(value, str) else bytes(value)
        text = isinstance(raw, bytes) and raw.startswith(_TEXT_BYTES)
        if text:
            raw = raw.decode("ascii")  # type: ignore[union-attr]
        context = None
        if self.guard.policy.get(classification).required_context:
            context = self.guard.inspect(raw).context
        out = self.guard.rewrap(raw, context)
        return out.encode("ascii") if text and isinstance(out, str) else out


_TEXT_BYTES = envelope.TEXT_PREFIX.encode("ascii")
