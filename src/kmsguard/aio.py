"""AsyncGuard: a Guard for asyncio applications, whose event loop must never wait on KMS.

A Guard call served from the data-key cache is AES-GCM in memory and costs less than a
hand-off to a thread; one that misses waits a network round trip to the key service.
AsyncGuard runs the first kind on the event loop and everything else in a thread pool:

* inline: only what Guard serves on its fast route, which never calls the key service
  and writes nothing but the in-memory hit (Guard.encrypt_if_cached,
  Guard.decrypt_if_cached): an encrypt or decrypt, their ``_text`` forms, and each such
  item of a batch;
* in the pool: everything else, whatever happened before. A kind whose cached key has
  just expired or been used up, a first operation of a kind the cache has not yet seen,
  a strict classification's operation (its audit record is synced to disk), an
  argument Guard will refuse: the full route may call KMS or touch the disk, so the
  loop never runs it. A batch's other items go to the pool together, as Guard's own
  batch, so that their KMS calls overlap; every rewrap, ``protect`` and ``unprotect``
  runs there.

``inspect`` parses a header and ``mask`` uses no key; neither calls KMS: always inline.
Errors are Guard's own. The operations run in a copy of the caller's context, so
``operation.acting_as`` and ``operation.serving`` apply to them.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from kmsguard import batch, envelope
from kmsguard.errors import InvalidInput, KmsGuardError
from kmsguard.guard import Context, EnvelopeInfo, EnvelopeInput, Guard, text_of, utf8_of

T = TypeVar("T")

DEFAULT_THREADS = 32


class AsyncGuard:
    """The methods of :class:`~kmsguard.guard.Guard`, as coroutines. Wraps (does not own) ``guard``
    unless ``owns`` is set; ``close()`` then closes it too."""

    def __init__(self, guard: Guard, *, max_threads: int = DEFAULT_THREADS, owns: bool = False) -> None:
        self.guard = guard
        self._pool = ThreadPoolExecutor(max_workers=max_threads, thread_name_prefix="kmsguard-aio")
        self._owns = owns

    async def encrypt(self, plaintext: bytes, classification: str, context: Context = None) -> bytes:
        sealed = self.guard.encrypt_if_cached(plaintext, classification, context)
        if sealed is not None:
            return sealed
        return await self._in_pool(self.guard.encrypt, plaintext, classification, context)

    async def decrypt(self, data: EnvelopeInput, context: Context = None) -> bytes:
        plain = self.guard.decrypt_if_cached(data, context)
        if plain is not None:
            return plain
        return await self._in_pool(self.guard.decrypt, data, context)

    async def encrypt_text(self, text: str, classification: str, context: Context = None) -> str:
        """The route of ``encrypt``: a cache hit inline, anything else in the pool."""
        sealed = self.guard.encrypt_if_cached(utf8_of(text), classification, context)
        if sealed is not None:
            return envelope.to_text(sealed)
        return await self._in_pool(self.guard.encrypt_text, text, classification, context)

    async def decrypt_text(self, token: str, context: Context = None) -> str:
        """The route of ``decrypt``, then Guard.decrypt_text's check that the plaintext is UTF-8."""
        plain = self.guard.decrypt_if_cached(token, context)
        if plain is not None:
            return text_of(plain)
        return await self._in_pool(self.guard.decrypt_text, token, context)

    async def encrypt_many(
        self,
        items: Sequence[bytes],
        classification: str,
        context: Context = None,
        contexts: Sequence[Context] | None = None,
        max_concurrency: int = batch.DEFAULT_CONCURRENCY,
    ) -> list[batch.Result[bytes]]:
        """Cache hits inline (Guard.encrypt_if_cached: no key-service call), the rest in the
        pool, Guard's own batch, which overlaps the KMS calls."""
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
            many = self.guard.encrypt_many
            done = await self._in_pool(many, rest, classification, None, [each[i] for i in missed], max_concurrency)
            for i, settled in zip(missed, done, strict=True):
                results[i] = settled
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

    async def _in_pool(self, fn: Callable[..., T], *args: Any) -> T:
        ctx = contextvars.copy_context()
        return await asyncio.get_running_loop().run_in_executor(self._pool, ctx.run, fn, *args)
