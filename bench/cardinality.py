"""Round trips per second over N distinct contexts, the memory each cached key costs, and KMS calls by bound context.

A per-user context (``{"user_id": ...}``), local keyring, 1 KiB records: each round trip
encrypts a record under the next context in a cycle over N and decrypts it. The data-key
cache has its default capacity (``[cache] max_entries`` = 16,384, encrypt and decrypt
entries together), so N = 1,000 fits and N = 10,000 (20,000 entries) does not: a cycle
longer than the cache misses on every operation. Each row is run with the cache on
(default limits) and off (``reuse = false``, ``decrypt_ttl = 0``), audit and metrics off
and on (SQLite sink, the default). The four configurations run in turn, ROUNDS slices
each, and the best slice counts (the least disturbed by other processes).

Targets: for N up to half the capacity, >= 0.7x the N = 1 figure; above the capacity,
the cost per operation within 10% of the cache-off figure for the same N (the miss, a
call to the keyring, is all it costs).

Memory: tracemalloc (Python objects) and the process' resident size (which also counts
the native AES-GCM key objects), per cached data key and per plan.

KMS calls: N = 1,000 users of one tenant against a local KMS (moto, through kmsguard's
counting proxy), three round trips each, with every context key bound at KMS
(``kms_context_keys`` unset, the default) and with only ``["tenant"]`` bound.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import tempfile
import time
import tracemalloc
from dataclasses import replace
from pathlib import Path

from bench.common import table
from kmsguard import Guard
from kmsguard.config import load_settings
from kmsguard.keyrings.base import KeyRequest
from kmsguard.keyrings.caching import DEFAULT_MAX_ENTRIES, CachingKeyring
from kmsguard.keyrings.local import KEY_FILE_NAME, LocalKeyring
from kmsguard.metrics import Metrics
from kmsguard.operation import Observer
from kmsguard.policy import CacheLimits, ClassPolicy, Policy
from kmsguard.stack import build_observers

SIZE = 1024
NS = (1, 1_000, 10_000, 100_000)
SLICE = 0.4
ROUNDS = 5
_DATA = os.urandom(SIZE)
#: Contexts each configuration cycles through before it is timed (plans, keys and kinds learned).
WARM = 20_000
MEMORY_ENTRIES = 20_000
USERS = 1_000


def _policy(cache: bool) -> Policy:
    base = Policy.defaults({n: f"local:{n}" for n in ("general", "pii", "payment")})
    general = base.get("general")
    if cache:
        return base
    return base.with_class(replace(general, cache=replace(general.cache, reuse=False, decrypt_ttl=0)))


def _observers(home: Path, keyring: LocalKeyring) -> list[Observer]:
    settings = load_settings({"KMSGUARD_HOME": str(home)})
    return build_observers(settings, keyring, Metrics())


class _Cycle:
    """One configuration's Guard and where it is in its cycle over the contexts."""

    def __init__(self, guard: Guard, contexts: list[dict[str, str]]) -> None:
        self.guard, self.contexts, self.next = guard, contexts, 0

    def run(self, count: int) -> None:
        guard, contexts, i, n = self.guard, self.contexts, self.next, len(self.contexts)
        data = _DATA
        for _ in range(count):
            ctx = contexts[i]
            i = i + 1 if i + 1 < n else 0
            guard.decrypt(guard.encrypt(data, "general", ctx), ctx)
        self.next = i

    def rate(self) -> float:
        """Round trips per second over one slice of about SLICE seconds."""
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < SLICE:
            self.run(50)
            done += 50
        return done / (time.perf_counter() - start)


def throughput() -> list[tuple[int, dict[tuple[bool, bool], float]]]:
    """Per N: round trips/s per (cache on, audit on), the best of ROUNDS slices taken in turn."""
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        keyring = LocalKeyring.create(home / KEY_FILE_NAME, ("general", "pii", "payment"))
        for n in NS:
            contexts = [{"user_id": f"user-{i:06d}"} for i in range(n)]
            cycles = {}
            for cache in (True, False):
                for audit in (False, True):
                    policy = _policy(cache)
                    observers = _observers(home, keyring) if audit else []
                    cycle = _Cycle(Guard(policy, CachingKeyring(keyring, policy), observers=observers), contexts)
                    cycle.run(min(n, WARM))  # one cycle: plans, keys and kinds learned
                    cycles[(cache, audit)] = cycle
            best = dict.fromkeys(cycles, 0.0)
            for _ in range(ROUNDS):
                for config, cycle in cycles.items():
                    best[config] = max(best[config], cycle.rate())
            for cycle in cycles.values():
                cycle.guard.close()
            out.append((n, best))
    return out


def memory() -> list[tuple[str, float, float]]:
    """(what, bytes per item by tracemalloc, bytes per item by resident size), measured in a
    fresh interpreter: memory this process freed earlier would hide the growth."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_memory)


def _memory() -> list[tuple[str, float, float]]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        keyring = LocalKeyring.create(Path(tmp) / KEY_FILE_NAME, ("general", "pii", "payment"))
        policy = _policy(True)
        data = b"x" * SIZE

        def cache_entries() -> object:
            cache = CachingKeyring(keyring, policy, max_entries=MEMORY_ENTRIES)
            for i in range(MEMORY_ENTRIES):
                cache.lend(KeyRequest("general", "local:general", {"user_id": f"user-{i:06d}"}), 0)
            return cache

        def round_trips() -> object:  # a Guard: per context an encrypt plan, a decrypt plan and two entries
            guard = Guard(policy, CachingKeyring(keyring, policy, max_entries=2 * MEMORY_ENTRIES))
            for i in range(MEMORY_ENTRIES):
                ctx = {"user_id": f"user-{i:06d}"}
                guard.decrypt(guard.encrypt(data, "general", ctx), ctx)
            return guard

        for what, build in (
            ("cached data key (encrypt entry)", cache_entries),
            ("context in use (2 plans + 2 entries)", round_trips),
        ):
            gc.collect()
            rss0 = _rss()
            tracemalloc.start()
            kept = build()
            traced = tracemalloc.get_traced_memory()[0]
            tracemalloc.stop()
            gc.collect()
            rss = _rss() - rss0
            rows.append((what, traced / MEMORY_ENTRIES, rss / MEMORY_ENTRIES))
            del kept
    return rows


def _rss() -> int:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def kms_calls() -> tuple[list[tuple[str, int, int, int]], tuple[float, float]]:
    """KMS calls for USERS users, 3 round trips each: (bound context, operations, GenerateDataKey
    calls, Decrypt calls) per binding; and round trips/s above the capacity, cache on and off."""
    from bench.local_kms import factory, local_regions
    from kmsguard.keyrings.aws_kms import AwsKmsKeyring

    rows = []
    with local_regions("us-east-1") as (region,):
        clients = factory([region])
        keyring = AwsKmsKeyring(clients, region.name)
        key = region.create_key()
        contexts = [{"tenant": "acme", "user_id": f"user-{i:04d}"} for i in range(USERS)]
        for label, bound in (("all (default)", None), ('["tenant"]', frozenset({"tenant"}))):
            policy = Policy([ClassPolicy("general", key, kms_context_keys=bound, cache=CacheLimits())])
            cycle = _Cycle(Guard(policy, CachingKeyring(keyring, policy)), contexts)
            region.proxy.reset_counts()
            cycle.run(3 * USERS)
            counts = region.proxy.counts
            rows.append((label, 6 * USERS, counts["GenerateDataKey"], counts["Decrypt"]))
        # Above the capacity every operation misses: with a KMS call per miss, that call is the cost.
        cycles = {}
        for cache in (True, False):
            limits = CacheLimits() if cache else CacheLimits(reuse=False, decrypt_ttl=0)
            policy = Policy([ClassPolicy("general", key, cache=limits)])
            cycles[cache] = _Cycle(Guard(policy, CachingKeyring(keyring, policy, max_entries=USERS // 2)), contexts)
        best = dict.fromkeys(cycles, 0.0)
        for _ in range(3):
            for cache, cycle in cycles.items():
                start = time.perf_counter()
                cycle.run(USERS // 4)
                best[cache] = max(best[cache], USERS // 4 / (time.perf_counter() - start))
        clients.close()
    return rows, (best[True], best[False])


def main() -> None:
    half = DEFAULT_MAX_ENTRIES // 2
    results = throughput()
    for audit in (False, True):
        base = dict(results)[1][(True, audit)]
        rows = []
        for n, rates in results:
            on, off = rates[(True, audit)], rates[(False, audit)]
            entries = 2 * n  # an encrypt and a decrypt entry per context
            if entries <= half:
                check, target = f"{on / base:.2f}x N=1", ">= 0.7x N=1"
            elif entries > DEFAULT_MAX_ENTRIES:
                check, target = f"{(off / on - 1) * 100:+.0f}% per op", "<= +10% vs cache off"
            else:
                check, target = "-", "-"
            rows.append([f"{n:,}", f"{on:,.0f}", f"{off:,.0f}", check, target])
        print(f"{SIZE} B round trips/s over N contexts, audit + metrics {'on (SQLite)' if audit else 'off'}:")
        print(table(["N", "cache on", "cache off", "measured", "target"], rows))
        print()
    print(f"memory, {MEMORY_ENTRIES:,} items:")
    rows = [[what, f"{traced:,.0f}", f"{rss:,.0f}"] for what, traced, rss in memory()]
    print(table(["per", "bytes (tracemalloc)", "bytes (resident size)"], rows))
    print()
    calls, (on, off) = kms_calls()
    print(f"KMS calls, {USERS:,} users of one tenant, 3 round trips each (moto):")
    rows = [
        [label, f"{ops:,}", str(gen), str(dec), f"{(gen + dec) * 1000 / ops:.1f}"] for label, ops, gen, dec in calls
    ]
    print(table(["bound at KMS", "operations", "GenerateDataKey", "Decrypt", "KMS calls / 1,000 ops"], rows))
    print()
    print(f"above the capacity against moto (N = {USERS:,}, max_entries = {USERS // 2}, every operation a KMS call):")
    rows = [[f"{on:,.0f}", f"{off:,.0f}", f"{(off / on - 1) * 100:+.0f}% per op", "<= +10% vs cache off"]]
    print(table(["cache on, round trips/s", "cache off", "measured", "target"], rows))


if __name__ == "__main__":
    main()
