"""AsyncGuard: a Guard for asyncio applications, whose event loop must never wait on KMS.

A Guard call served from the data-key cache is AES-GCM in memory and costs less than a
hand-off to a thread; one that misses waits a network round trip to the key service.
AsyncGuard runs the first kind on the event loop and the second in a thread pool:

* an encrypt of a (classification, context), or a decrypt of an envelope under given
  wrapped keys and context, is *warm* once an operation of that kind finished without
  a key-service call (kmsguard.operation.kms_tally counts them); warm kinds run inline;
* an encrypt batch whose kinds are all warm runs inline too, item after item (in the
  pool it would cost a thread hand-off and then hold the GIL the loop needs all the same);
* an operation, or a batch's item, that a cache hit serves on its fast route
  (Guard.encrypt_if_cached, Guard.decrypt_if_cached) runs inline first, whatever its kind;
* everything else, and every rewrap and any other batch, runs in the pool (a batch as
  Guard runs it, on several threads, so that its KMS calls overlap);
* an inline operation that did call the key service (its cached key expired or was used
  up) turns its kind cold again, so a kind costs the loop at most one such call per
  refresh of its cached key, never one per operation.

``inspect`` parses a header and ``mask`` uses no key; neither calls KMS: always inline.
``protect`` and ``unprotect`` of a record always run in the pool. Errors are Guard's own.
The operations run in a copy of the caller's context, so ``operation.acting_as`` and
``operation.serving`` apply to them.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import threading
from collections.abc import Callable, Hashable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from kmsguard import batch, envelope, operation
from kmsguard.errors import InvalidInput, KmsGuardError
from kmsguard.guard import Context, EnvelopeInfo, EnvelopeInput, Guard

T = TypeVar("T")

#: Kinds remembered as warm before starting over (a forgotten kind costs one pool run).
MAX_WARM = 4096
DEFAULT_THREADS = 32


class AsyncGuard:
    """The methods of :class:`~kmsguard.guard.Guard`, as coroutines. Wraps (does not own) ``guard``
    unless ``owns`` is set; ``close()`` then closes it too."""

    def __init__(self, guard: Guard, *, max_threads: int = DEFAULT_THREADS, owns: bool = False) -> None:
        self.guard = guard
        self._pool = ThreadPoolExecutor(max_workers=max_threads, thread_name_prefix="kmsguard-aio")
        self._warm: dict[Hashable, bool] = {}
        self._lock = threading.Lock()
        self._owns = owns

    async def encrypt(self, plaintext: bytes, classification: str, context: Context = None) -> bytes:
        sealed = self.guard.encrypt_if_cached(plaintext, classification, context)
        if sealed is not None:
            return sealed
        kind = _kind("encrypt", classification, context)
        return await self._run(kind, self.guard.encrypt, plaintext, classification, context)

    async def decrypt(self, data: EnvelopeInput, context: Context = None) -> bytes:
        plain = self.guard.decrypt_if_cached(data, context)
        if plain is not None:
            return plain
        return await self._run(_decrypt_kind(data, context), self.guard.decrypt, data, context)

    async def encrypt_text(self, text: str, classification: str, context: Context = None) -> str:
        kind = _kind("encrypt", classification, context)
        return await self._run(kind, self.guard.encrypt_text, text, classification, context)

    async def decrypt_text(self, token: str, context: Context = None) -> str:
        return await self._run(_decrypt_kind(token, context), self.guard.decrypt_text, token, context)

    async def encrypt_many(
        self,
        items: Sequence[bytes],
        classification: str,
        context: Context = None,
        contexts: Sequence[Context] | None = None,
        max_concurrency: int = batch.DEFAULT_CONCURRENCY,
    ) -> list[batch.Result[bytes]]:
        """Cache hits inline (Guard.encrypt_if_cached: no key-service call); the rest inline,
        item after item, when every kind among them is warm; else in the pool, Guard's own
        batch, which overlaps the KMS calls."""
        if contexts is not None and len(contexts) != len(items):
            raise InvalidInput("contexts must have one entry per item")
        each = [context] * len(items) if contexts is None else list(contexts)
        result, hit = batch.Result, self.guard.encrypt_if_cached
        results: list[batch.Result[bytes]] = []
        missed: list[int] = []
        for i, (item, item_context) in enumerate(zip(items, each, strict=True)):
            sealed = hit(item, classification, item_context)
            if sealed is None:
                missed.append(i)
            results.append(result(sealed))
        if missed:
            rest = [items[i] for i in missed]
            done = await self._encrypt_rest(rest, classification, [each[i] for i in missed], max_concurrency)
            for i, settled in zip(missed, done, strict=True):
                results[i] = settled
        return results

    async def _encrypt_rest(
        self, items: Sequence[bytes], classification: str, contexts: list[Context], max_concurrency: int
    ) -> list[batch.Result[bytes]]:
        kinds = _kinds("encrypt", classification, contexts)
        results: list[batch.Result[bytes]]
        if None not in kinds and all(self._warm.get(k) for k in kinds):
            results, calls = _counted(_in_turn, self.guard, items, classification, contexts)
        else:
            many = self.guard.encrypt_many
            args = (items, classification, None, contexts, max_concurrency)
            results, calls = await self._in_pool(_counted, many, *args)
        if None not in kinds:
            for kind in kinds:
                self._mark(kind, not calls)
        return results

    async def decrypt_many(
        self,
        envelopes: Sequence[EnvelopeInput],
        context: Context = None,
        max_concurrency: int = batch.DEFAULT_CONCURRENCY,
    ) -> list[batch.Result[bytes]]:
        """Cache hits inline (Guard.decrypt_if_cached: no key-service call), the rest in the
        pool, Guard's own batch."""
        result, hit = batch.Result, self.guard.decrypt_if_cached
        results: list[batch.Result[bytes]] = []
        missed: list[int] = []
        for i, data in enumerate(envelopes):
            try:
                plain = hit(data, context)
            except KmsGuardError as exc:
                results.append(result(error=exc))
                continue
            if plain is None:
                missed.append(i)
            results.append(result(plain))
        if missed:
            rest = [envelopes[i] for i in missed]
            done = await self._in_pool(self.guard.decrypt_many, rest, context, max_concurrency)
            for i, settled in zip(missed, done, strict=True):
                results[i] = settled
        return results

    async def rewrap(self, data: EnvelopeInput, context: Context = None) -> bytes | str:
        """Always a key-service call: in the pool."""
        return await self._in_pool(self.guard.rewrap, data, context)

    async def inspect(self, data: EnvelopeInput) -> EnvelopeInfo:
        return self.guard.inspect(data)

    async def protect(
        self,
        record: Any,
        fields: Mapping[str, Any] | None = None,
        context: Context = None,
        *,
        missing: str = "error",
        detect: bool = False,
        keep: Sequence[str] = (),
    ) -> Any:
        """Guard.protect, in the pool: a record's fields may need data keys of several
        classifications, and one thread hand-off per record is small next to its fields' work."""
        run = functools.partial(self.guard.protect, missing=missing, detect=detect, keep=keep)
        return await self._in_pool(run, record, fields, context)

    async def unprotect(self, record: Any, context: Context = None, *, paths: Sequence[str] | None = None) -> Any:
        """Guard.unprotect, in the pool: a record's tokens may be under many data keys."""
        return await self._in_pool(functools.partial(self.guard.unprotect, paths=paths), record, context)

    async def mask(self, record: Any, fields: Sequence[str], rules: Mapping[str, Any] | None = None) -> Any:
        """Guard.mask, inline: masking uses no key and never calls the key service."""
        return self.guard.mask(record, fields, rules)

    async def close(self) -> None:
        """Stop the pool once running operations end; close the Guard if this AsyncGuard owns it."""
        await asyncio.get_running_loop().run_in_executor(None, self._shutdown)

    def _shutdown(self) -> None:
        self._pool.shutdown(wait=True)
        if self._owns:
            self.guard.close()

    # ------------------------------------------------------------------ internals

    async def _run(self, kind: Hashable | None, fn: Callable[..., T], *args: Any) -> T:
        if kind is not None and self._warm.get(kind):
            result, calls = _counted(fn, *args)
            if calls:
                self._mark(kind, False)
            return result
        ctx = contextvars.copy_context()
        result, calls = await asyncio.get_running_loop().run_in_executor(self._pool, ctx.run, _counted, fn, *args)
        if kind is not None and not calls:
            self._mark(kind, True)
        return result

    async def _in_pool(self, fn: Callable[..., T], *args: Any) -> T:
        ctx = contextvars.copy_context()
        return await asyncio.get_running_loop().run_in_executor(self._pool, ctx.run, fn, *args)

    def _mark(self, kind: Hashable, warm: bool) -> None:
        with self._lock:
            if warm and len(self._warm) >= MAX_WARM:
                self._warm.clear()
            self._warm[kind] = warm


def _in_turn(
    guard: Guard, items: Sequence[bytes], classification: str, contexts: Sequence[Context]
) -> list[batch.Result[bytes]]:
    result, encrypt = batch.Result, guard.encrypt  # looked up once: a warm item costs little more
    out: list[batch.Result[bytes]] = []
    for item, context in zip(items, contexts, strict=True):
        try:
            value = encrypt(item, classification, context)
        except KmsGuardError as exc:
            out.append(result(error=exc))
            continue
        out.append(result(value))
    return out


def _counted(fn: Callable[..., T], *args: Any) -> tuple[T, int]:
    """``fn(*args)`` and how many key-service calls it made."""
    tally = [0]
    token = operation.kms_tally.set(tally)
    try:
        return fn(*args), tally[0]
    finally:
        operation.kms_tally.reset(token)


def _kind(name: str, classification: object, context: Context) -> Hashable | None:
    """What encrypts of one data key share; None for arguments Guard will refuse (they run in the pool)."""
    try:
        items = tuple(sorted(context.items())) if context else ()
        return (name, classification, items) if isinstance(classification, str) else None
    except (AttributeError, TypeError):
        return None


def _kinds(name: str, classification: object, contexts: Sequence[Context]) -> set[Hashable | None]:
    """``_kind`` of each context, worked out once per distinct context (a batch's items often share one)."""
    seen: dict[Hashable, Hashable | None] = {}
    last: object = seen  # no context is this
    for context in contexts:
        if context is last:
            continue
        last = context
        try:
            key: Hashable = tuple(context.items()) if context else ()
            if key not in seen:
                seen[key] = _kind(name, classification, context)
        except (AttributeError, TypeError):  # not a mapping, or unhashable values
            return {None}
    return set(seen.values())


def _decrypt_kind(data: object, context: Context) -> Hashable | None:
    """The wrapped keys (so the data key) and the caller's context; None if the envelope does not parse."""
    try:
        parsed = envelope.parse(envelope.coerce(data))  # type: ignore[arg-type]
        items = tuple(sorted(context.items())) if context else ()
    except (KmsGuardError, AttributeError, TypeError):
        return None
    return ("decrypt", parsed.wrapped_keys, items)
