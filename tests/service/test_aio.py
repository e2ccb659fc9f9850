"""AsyncGuard: what may call KMS runs in the thread pool, cache hits run on the event loop."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from kmsguard import Guard
from kmsguard.aio import AsyncGuard
from kmsguard.config import load_settings
from kmsguard.fastpath import OperationEvent
from kmsguard.keyrings.caching import CachingKeyring
from kmsguard.keyrings.local import LocalKeyring
from kmsguard.operation import acting_as
from kmsguard.stack import build_keyring


class Threads:
    """An observer noting which thread ran each operation, and for whom."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str]] = []

    def observe(self, event: OperationEvent) -> None:
        self.seen.append((event.operation, threading.current_thread().name, event.principal))


def test_kms_work_in_the_pool_cache_hits_inline(kmsguard_aws_env: dict[str, str]) -> None:
    settings = load_settings()
    keyring = build_keyring(settings)
    assert isinstance(keyring, CachingKeyring)
    threads = Threads()
    guard = Guard(settings.policy, keyring, observers=[threads], principal="svc")

    async def run() -> None:
        aguard = AsyncGuard(guard)
        loop_thread = threading.current_thread().name
        with acting_as("app-key"):
            first = await aguard.encrypt(b"a", "pii", {"u": "1"})  # GenerateDataKey: pool
            await aguard.encrypt(b"b", "pii", {"u": "1"})  # a new kind: pool, and no KMS call, so warm
            await aguard.encrypt(b"c", "pii", {"u": "1"})  # warm: inline
            await aguard.decrypt(first, {"u": "1"})  # Decrypt: pool (a decrypt entry is its own)
            await aguard.decrypt(first, {"u": "1"})  # served from the cache: pool, then warm
            await aguard.decrypt(first, {"u": "1"})  # inline
            keyring.clear()
            await aguard.encrypt(b"d", "pii", {"u": "1"})  # warm but missed: inline, one KMS call, cold again
            await aguard.encrypt(b"e", "pii", {"u": "1"})  # so: pool (no KMS call: warm again)
            await aguard.encrypt(b"f", "pii", {"u": "1"})  # inline
            await aguard.rewrap(first)  # always the pool
            info = await aguard.inspect(first)  # never KMS
            assert info.classification == "pii"
        await aguard.close()
        where = ["loop" if t == loop_thread else "pool" for _, t, _ in threads.seen]
        assert where == ["pool", "pool", "loop", "pool", "pool", "loop", "loop", "pool", "loop", "pool"]
        assert {p for _, _, p in threads.seen} == {"app-key"}

    asyncio.run(run())
    guard.close()


def test_batches_serve_cache_hits_inline_and_the_rest_in_the_pool(keyring: LocalKeyring, home: Path) -> None:
    settings = load_settings({"KMSGUARD_HOME": str(home)})
    threads = Threads()
    guard = Guard(settings.policy, build_keyring(settings), observers=[threads], principal="svc")

    async def run() -> None:
        aguard = AsyncGuard(guard)
        loop_thread = threading.current_thread().name
        with acting_as("app-key"):
            # A new kind: the pool (a data key is made, then a cache hit on the full route).
            first = await aguard.encrypt_many([b"a", b"b"], "pii", {"u": "1"}, max_concurrency=1)
            second = await aguard.encrypt_many([b"c", b"d"], "pii", {"u": "1"})  # cache hits: inline
            sealed = [r.get() for r in first + second]
            # No key on the envelopes' decrypt plan yet: the pool, the garbage refused there.
            opened = await aguard.decrypt_many([*sealed, b"garbage"], {"u": "1"}, max_concurrency=1)
            assert [r.ok for r in opened] == [True] * 4 + [False]
            again = await aguard.decrypt_many(sealed, {"u": "1"})  # cache hits: inline
            assert [r.get() for r in again] == [b"a", b"b", b"c", b"d"]
        await aguard.close()
        where = ["loop" if t == loop_thread else "pool" for _, t, _ in threads.seen]
        assert where == ["pool"] * 2 + ["loop"] * 2 + ["pool"] * 5 + ["loop"] * 4
        assert [op for op, _, _ in threads.seen] == ["encrypt"] * 4 + ["decrypt"] * 9
        assert {p for _, _, p in threads.seen} == {"app-key"}

    asyncio.run(run())
    guard.close()
