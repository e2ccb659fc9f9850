"""AsyncGuard: what may call KMS runs in the thread pool, cache hits run on the event loop."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from pathlib import Path

from kmsguard import Guard
from kmsguard.aio import AsyncGuard
from kmsguard.config import load_settings
from kmsguard.fastpath import OperationEvent
from kmsguard.keyrings.caching import CachingKeyring
from kmsguard.keyrings.local import LocalKeyring
from kmsguard.operation import acting_as
from kmsguard.stack import build_keyring
from kmsguard.testing.region import KmsRegion


class Threads:
    """An observer noting which thread ran each operation, for whom, and its KMS calls."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str, int]] = []

    def observe(self, event: OperationEvent) -> None:
        self.seen.append((event.operation, threading.current_thread().name, event.principal, event.kms_calls))


def test_kms_work_in_the_pool_cache_hits_inline(kmsguard_aws_env: dict[str, str]) -> None:
    settings = load_settings()
    keyring = build_keyring(settings)
    assert isinstance(keyring, CachingKeyring)
    threads = Threads()
    guard = Guard(settings.policy, keyring, observers=[threads], principal="svc")

    async def run() -> None:
        aguard = AsyncGuard(guard)
        with acting_as("app-key"):
            first = await aguard.encrypt(b"a", "pii", {"u": "1"})  # GenerateDataKey: pool
            await aguard.encrypt(b"b", "pii", {"u": "1"})  # a cache hit on the full route (no fast route yet): pool
            await aguard.encrypt(b"c", "pii", {"u": "1"})  # Guard.encrypt_if_cached serves it: inline
            text = await aguard.encrypt_text("é", "pii", {"u": "1"})  # the same route: inline
            await aguard.decrypt(first, {"u": "1"})  # Decrypt: pool (a decrypt entry is its own)
            await aguard.decrypt(first, {"u": "1"})  # served from the cache on the full route: pool
            await aguard.decrypt(first, {"u": "1"})  # Guard.decrypt_if_cached: inline
            assert await aguard.decrypt_text(text, {"u": "1"}) == "é"  # inline
            keyring.clear()  # as when the cached keys expire
            await aguard.encrypt(b"d", "pii", {"u": "1"})  # missed: pool, one KMS call
            await aguard.encrypt_text("e", "pii", {"u": "1"})  # a hit, not yet on the fast route: pool
            await aguard.decrypt_text(text, {"u": "1"})  # missed: pool, one KMS call
            await aguard.rewrap(first)  # always the pool
            info = await aguard.inspect(first)  # never KMS
            assert info.classification == "pii"
        await aguard.close()

    loop_thread = threading.current_thread().name  # asyncio.run's loop runs in this thread
    asyncio.run(run())
    guard.close()
    seen = [("loop" if t == loop_thread else "pool", "kms" if calls else "-") for _, t, _, calls in threads.seen]
    assert seen == [
        ("pool", "kms"), ("pool", "-"), ("loop", "-"), ("loop", "-"),
        ("pool", "kms"), ("pool", "-"), ("loop", "-"), ("loop", "-"),
        ("pool", "kms"), ("pool", "-"), ("pool", "kms"), ("pool", "kms"),
    ]
    assert {p for _, _, p, _ in threads.seen} == {"app-key"}


def test_the_loop_keeps_running_while_kms_answers_slowly(
    kmsguard_aws_env: dict[str, str], kms_region: KmsRegion
) -> None:
    """A coroutine ticking every 10 ms keeps ticking through every KMS call (each waits
    ``latency``), those of a kind whose cached key has just expired included."""
    latency = 0.5
    settings = load_settings()
    keyring = build_keyring(settings)
    assert isinstance(keyring, CachingKeyring)
    guard = Guard(settings.policy, keyring, principal="svc")

    async def run() -> float:
        aguard = AsyncGuard(guard)
        ticks: list[float] = []
        done = asyncio.Event()

        async def tick() -> None:  # notes each wake-up, the last one after ``done`` too
            ticks.append(time.monotonic())
            while not done.is_set():
                await asyncio.sleep(0.01)
                ticks.append(time.monotonic())

        ticker = asyncio.create_task(tick())
        await asyncio.sleep(0.05)
        kms_region.proxy.latency(latency)
        started = time.monotonic()
        token = await aguard.encrypt_text("x", "pii", {"u": "1"})
        for _ in range(3):  # a data key, then cache hits: the full route, then the fast one
            await aguard.encrypt_text("y", "pii", {"u": "1"})
            await aguard.decrypt_text(token, {"u": "1"})
        keyring.clear()  # expired: the next encrypt and decrypt call KMS
        await aguard.encrypt_text("z", "pii", {"u": "1"})
        await aguard.decrypt_text(token, {"u": "1"})
        assert time.monotonic() - started >= 4 * latency  # the KMS calls did wait
        done.set()
        await ticker
        await aguard.close()
        return max(b - a for a, b in itertools.pairwise(ticks))

    longest = asyncio.run(run())
    guard.close()
    assert longest < latency / 2


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
        where = ["loop" if t == loop_thread else "pool" for _, t, _, _ in threads.seen]
        assert where == ["pool"] * 2 + ["loop"] * 2 + ["pool"] * 5 + ["loop"] * 4
        assert [op for op, _, _, _ in threads.seen] == ["encrypt"] * 4 + ["decrypt"] * 9
        assert {p for _, _, p, _ in threads.seen} == {"app-key"}

    asyncio.run(run())
    guard.close()
