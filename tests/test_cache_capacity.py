"""The data-key cache and Guard's plans at production cardinality (many contexts, many threads).

Exact least-recently-used eviction under hits (through the cache or a plan's lane) and
inserts; limits that hold exactly with many entries and threads; bounded memory for a
million distinct contexts; ``[cache] max_entries`` and the metrics that show the cache.
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pytest

from kmsguard import ConfigurationError, Guard, envelope
from kmsguard.config import load_settings
from kmsguard.datakey import DataKey, WrappedKey
from kmsguard.keyrings.base import KeyRequest
from kmsguard.keyrings.caching import DEFAULT_MAX_ENTRIES, CachingKeyring
from kmsguard.keyrings.local import LocalKeyring
from kmsguard.metrics import Metrics
from kmsguard.policy import CacheLimits, ClassPolicy, Policy
from test_caching import Clock, Counting


def policy_with(**limits: object) -> Policy:
    base = Policy.defaults({n: f"local:{n}" for n in ("general", "pii", "payment")})
    return base.with_class(replace(base.get("general"), cache=CacheLimits(**limits)))  # type: ignore[arg-type]


def wrapped_of(sealed: bytes) -> bytes:
    return envelope.parse(sealed).wrapped_keys[0].wrapped


@pytest.fixture
def counting(keyring: LocalKeyring) -> Counting:
    return Counting(keyring)


# ---------------------------------------------------------------------- exact LRU


def test_eviction_is_least_recently_used_under_lane_hits_cache_hits_and_inserts(counting: Counting) -> None:
    """Four contexts, room for three encrypt entries: each insert evicts exactly the one used longest ago."""
    policy = policy_with(decrypt_ttl=0)  # encrypt entries only
    guard = Guard(policy, CachingKeyring(counting, policy, max_entries=3))
    ctx = [{"tenant": str(i)} for i in range(5)]
    for i in range(3):
        guard.encrypt(b"x", "general", ctx[i])  # inserts 0, 1, 2
    guard.encrypt(b"x", "general", ctx[0])  # a lane hit: the cache's index is not touched
    assert counting.calls["generate"] == 3
    guard.encrypt(b"x", "general", ctx[3])  # evicts 1, the least recently used
    guard.encrypt(b"x", "general", ctx[0])
    guard.encrypt(b"x", "general", ctx[2])
    assert counting.calls["generate"] == 4
    guard.encrypt(b"x", "general", ctx[1])  # was evicted: a fresh key, evicting 3
    assert counting.calls["generate"] == 5
    guard.encrypt(b"x", "general", ctx[0])
    guard.encrypt(b"x", "general", ctx[2])
    assert counting.calls["generate"] == 5
    guard.encrypt(b"x", "general", ctx[3])
    assert counting.calls["generate"] == 6
    stats = guard.keyring.stats()  # type: ignore[attr-defined]
    assert (stats.entries, stats.evictions) == (3, 3)
    assert stats.by_classification["general"].evictions == 3


def test_plans_are_bounded_and_give_up_the_least_recently_used(keyring: LocalKeyring) -> None:
    policy = policy_with()
    guard = Guard(policy, CachingKeyring(keyring, policy), max_plans=4)
    for i in range(4):
        guard.encrypt(b"x", "general", {"n": str(i)})
    kept = guard._plans.encrypt.items[("general", (("n", "0"),))]
    guard.encrypt(b"x", "general", {"n": "0"})  # used last: 1 goes next
    guard.encrypt(b"x", "general", {"n": "9"})
    assert len(guard._plans.encrypt) == 4
    assert ("general", (("n", "1"),)) not in guard._plans.encrypt.items
    assert guard._plans.encrypt.items[("general", (("n", "0"),))] is kept  # one at a time, never cleared


# ---------------------------------------------------------------------- limits with many entries and threads


@pytest.mark.parametrize("max_entries", [DEFAULT_MAX_ENTRIES, 24])  # room for all, or constant eviction
def test_max_messages_and_max_bytes_hold_exactly_with_many_entries_and_threads(
    counting: Counting, racy: None, max_entries: int
) -> None:
    policy = policy_with(max_messages=7, max_bytes=100, decrypt_ttl=0)
    guard = Guard(policy, CachingKeyring(counting, policy, max_entries=max_entries))
    contexts = [{"tenant": str(i)} for i in range(40)]
    sealed: list[tuple[int, bytes]] = []
    lock = threading.Lock()

    def work(seed: int) -> None:
        for n in range(200):
            i = (seed * 7 + n) % len(contexts)
            out = guard.encrypt(b"m" * 10, "general", contexts[i])
            with lock:
                sealed.append((i, out))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    per_key = Counter(wrapped_of(s) for _, s in sealed)
    assert max(per_key.values()) <= 7  # max_messages, and max_bytes (10 messages of 10 bytes fit)
    assert len(per_key) == counting.calls["generate"]
    if max_entries == DEFAULT_MAX_ENTRIES:  # nothing evicted: exactly one key per 7 messages of a context
        per_context = Counter(i for i, _ in sealed)
        assert counting.calls["generate"] == sum(-(-n // 7) for n in per_context.values())


def test_max_age_holds_exactly_with_many_entries_and_threads(counting: Counting) -> None:
    clock = Clock()
    policy = policy_with(max_age=60, decrypt_ttl=0)
    guard = Guard(policy, CachingKeyring(counting, policy, max_entries=64, clock=clock))
    contexts = [{"tenant": str(i)} for i in range(100)]

    def round_of_encrypts() -> set[bytes]:
        keys: set[bytes] = set()
        lock = threading.Lock()

        def work(seed: int) -> None:
            for n in range(100):
                out = wrapped_of(guard.encrypt(b"m", "general", contexts[(seed + n) % 100]))
                with lock:
                    keys.add(out)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return keys

    before = round_of_encrypts()
    clock.now += 59.9
    during = round_of_encrypts()
    assert before & during  # still young: reused (those not evicted)
    clock.now += 0.1  # every key of the first round is now 60 s old
    after = round_of_encrypts()
    assert not before & after


# ---------------------------------------------------------------------- call counts below the capacity


def test_one_generate_per_context_and_one_unwrap_per_data_key_with_many_contexts(counting: Counting) -> None:
    policy = policy_with()
    guard = Guard(policy, CachingKeyring(counting, policy))
    contexts = [{"user_id": f"u{i}"} for i in range(2000)]  # 4,000 entries: within the default capacity
    sealed = [guard.encrypt(b"r%d" % n, "general", c) for n in range(3) for c in contexts]
    assert counting.calls["generate"] == len(contexts)
    fresh = Guard(policy, CachingKeyring(counting, policy))  # a reader that never saw the keys
    for n, s in enumerate(sealed):
        assert fresh.decrypt(s, contexts[n % len(contexts)]) == b"r%d" % (n // len(contexts))
    assert counting.calls["unwrap"] == len(contexts)


def test_binding_only_the_tenant_at_kms_lets_one_data_key_serve_every_user(counting: Counting) -> None:
    policy = Policy([ClassPolicy("general", "local:general", kms_context_keys=frozenset({"tenant"}))])
    guard = Guard(policy, CachingKeyring(counting, policy))
    sealed = [guard.encrypt(b"x", "general", {"tenant": "t1", "user_id": f"u{i}"}) for i in range(1000)]
    assert counting.calls["generate"] == 1
    assert guard.inspect(sealed[5]).context == {"tenant": "t1", "user_id": "u5"}  # still authenticated
    assert all(guard.decrypt(s, {"user_id": f"u{i}"}) == b"x" for i, s in enumerate(sealed))
    assert counting.calls["unwrap"] == 1  # one Decrypt for every user's envelopes


# ---------------------------------------------------------------------- a million contexts


class OneKey:
    """A keyring that hands out one real data key for every request: the cache's cost alone."""

    def __init__(self, keyring: LocalKeyring) -> None:
        self.key = keyring.generate(KeyRequest("general", "local:general", {}))
        self.calls = 0

    def generate(self, request: KeyRequest) -> DataKey:
        self.calls += 1
        return self.key

    def unwrap(self, wrapped: Sequence[WrappedKey], request: KeyRequest) -> DataKey:
        self.calls += 1
        return self.key

    def wrap(self, data_key: DataKey, request: KeyRequest) -> DataKey:
        return data_key

    def rewrap(self, wrapped: Sequence[WrappedKey], request: KeyRequest) -> tuple[WrappedKey, ...]:
        return tuple(wrapped)


def _rss() -> int:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_a_million_distinct_contexts_keep_memory_bounded(keyring: LocalKeyring) -> None:
    policy = policy_with()
    inner = OneKey(keyring)
    cache = CachingKeyring(inner, policy, max_entries=2000)
    guard = Guard(policy, cache, max_plans=2000)
    payload = b"p" * 64
    encrypt = guard.encrypt
    for i in range(100_000):
        encrypt(payload, "general", {"user_id": str(i)})
    baseline = _rss()
    for i in range(100_000, 1_000_000):
        encrypt(payload, "general", {"user_id": str(i)})
    grown = _rss() - baseline
    assert grown < 16 << 20, f"memory grew by {grown / 2**20:.1f} MiB after the tables were full"
    assert len(guard._plans.encrypt) == 2000 and cache.stats().entries == 2000
    assert inner.calls == 1_000_000  # every context new: one key each
    assert guard.decrypt(encrypt(payload, "general", {"user_id": "last"}), {"user_id": "last"}) == payload


# ---------------------------------------------------------------------- settings and metrics


def test_max_entries_comes_from_the_file_or_the_environment(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    assert load_settings({"KMSGUARD_HOME": str(home)}).cache_max_entries == DEFAULT_MAX_ENTRIES == 16_384
    (home / "kmsguard.toml").write_text("[cache]\nmax_entries = 500\n")
    assert load_settings({"KMSGUARD_HOME": str(home)}).cache_max_entries == 500
    s = load_settings({"KMSGUARD_HOME": str(home), "KMSGUARD_CACHE_MAX_ENTRIES": "64"})
    assert s.cache_max_entries == 64
    LocalKeyring.create(home / "keyring.json", ["general", "pii", "payment"])
    with Guard.from_settings(s) as guard:
        assert isinstance(guard.keyring, CachingKeyring) and guard.keyring.max_entries == 64
        assert guard._plans.encrypt.capacity == 64


@pytest.mark.parametrize(
    ("toml", "env", "field"),
    [
        ("[cache]\nmax_entries = 0\n", {}, "cache.max_entries:"),
        ("[cache]\nmax_entries = 1.5\n", {}, "cache.max_entries:"),
        ('[cache]\nmax_entries = "many"\n', {}, "cache.max_entries:"),
        ("[cache]\nsize = 3\n", {}, "cache.size: unknown setting"),
        ("cache = 3\n", {}, "cache:"),
        ("", {"KMSGUARD_CACHE_MAX_ENTRIES": "-1"}, "KMSGUARD_CACHE_MAX_ENTRIES:"),
        ("", {"KMSGUARD_CACHE_MAX_ENTRIES": "lots"}, "KMSGUARD_CACHE_MAX_ENTRIES:"),
    ],
)
def test_a_bad_max_entries_names_the_field(tmp_path: Path, toml: str, env: dict[str, str], field: str) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "kmsguard.toml").write_text(toml)
    with pytest.raises(ConfigurationError) as info:
        load_settings({"KMSGUARD_HOME": str(home), **env})
    assert field in str(info.value)


def test_metrics_show_live_entries_evictions_and_hits_per_classification(keyring: LocalKeyring) -> None:
    policy = policy_with(decrypt_ttl=0)
    metrics = Metrics()
    guard = Guard(policy, CachingKeyring(keyring, policy, max_entries=2, telemetry=metrics))
    for i in range(3):
        guard.encrypt(b"x", "general", {"tenant": str(i)})
        guard.encrypt(b"y", "general", {"tenant": str(i)})
    text = metrics.exposition().decode()
    assert 'kmsguard_cache_entries{classification="general"} 2.0' in text
    assert 'kmsguard_cache_events_total{classification="general",event="evict"} 1.0' in text
    assert 'kmsguard_cache_events_total{classification="general",event="hit"} 3.0' in text
    assert 'kmsguard_cache_events_total{classification="general",event="miss"} 3.0' in text
    assert "tenant" not in text
