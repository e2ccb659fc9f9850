"""CachingKeyring: limits, partitions, decrypt reuse, single flight, eviction, reporting.

The inner keyring is a real LocalKeyring behind a counting wrapper, so every "KMS call"
counted here is a real wrap or unwrap.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import pytest

from kmsguard import Guard, KeyDisabled, RateLimited, envelope
from kmsguard.datakey import DataKey, WrappedKey
from kmsguard.errors import InvalidInput
from kmsguard.fastpath import OperationEvent
from kmsguard.keyrings.base import KeyRequest, backend_of
from kmsguard.keyrings.caching import CachingKeyring
from kmsguard.keyrings.local import KEY_FILE_NAME, LocalKeyring
from kmsguard.policy import CacheLimits, ClassPolicy, Policy
from kmsguard.telemetry import Telemetry

GENERAL = KeyRequest("general", "local:general", {"tenant": "a"})


class Counting:
    """A real keyring that counts calls; ``gate`` (when set) holds every call until released."""

    def __init__(self, inner: LocalKeyring) -> None:
        self.inner = inner
        self.calls = {"generate": 0, "unwrap": 0}
        self.entered = threading.Event()
        self.gate: threading.Event | None = None
        self.fail: Exception | None = None  # raised by every call
        self.fail_next: list[Exception] = []  # raised by the next calls, one each
        self._lock = threading.Lock()

    def _enter(self, name: str) -> None:
        with self._lock:
            self.calls[name] += 1
            once = self.fail_next.pop(0) if self.fail_next else None
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(10)
        if once is not None:
            raise once
        if self.fail is not None:
            raise self.fail

    def generate(self, request: KeyRequest) -> DataKey:
        self._enter("generate")
        return self.inner.generate(request)

    def unwrap(self, wrapped: Sequence[WrappedKey], request: KeyRequest) -> DataKey:
        self._enter("unwrap")
        return self.inner.unwrap(wrapped, request)

    def wrap(self, data_key: DataKey, request: KeyRequest) -> DataKey:
        return self.inner.wrap(data_key, request)

    def rewrap(self, wrapped: Sequence[WrappedKey], request: KeyRequest) -> tuple[WrappedKey, ...]:
        return self.inner.rewrap(wrapped, request)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Recorder(Telemetry):
    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []
        self.hit_sources: list[Callable[[], Mapping[str, int]]] = []

    def cache_event(self, event: str, classification: str) -> None:
        self.events.append((event, classification))

    def cache_hits(self, source: Callable[[], Mapping[str, int]]) -> None:
        self.hit_sources.append(source)


def concurrently(counting: Counting, n: int, work: Callable[[], None]) -> None:
    """Start ``n`` threads at once, hold the keyring's first call until all have started, join."""
    counting.gate = threading.Event()
    start = threading.Barrier(n)

    def run() -> None:
        start.wait()
        work()

    threads = [threading.Thread(target=run) for _ in range(n)]
    for t in threads:
        t.start()
    assert counting.entered.wait(10)
    counting.gate.set()
    for t in threads:
        t.join(10)


@pytest.fixture
def counting(home: Path) -> Counting:
    return Counting(LocalKeyring.create(home / KEY_FILE_NAME, ["general", "pii", "payment"]))


def cache(counting: Counting, clock: Clock | None = None, max_entries: int = 64, **limits: object) -> CachingKeyring:
    return CachingKeyring(
        counting,
        {"general": CacheLimits(**limits)},  # type: ignore[arg-type]
        max_entries=max_entries,
        clock=clock or Clock(),
    )


# ---------------------------------------------------------------------- encrypt limits


def test_max_messages_bounds_each_key(counting: Counting) -> None:
    c = cache(counting, max_messages=3)
    keys = [c.lend(GENERAL, 10)[0] for _ in range(7)]
    assert counting.calls["generate"] == 3
    assert [keys.count(k) for k in dict.fromkeys(keys)] == [3, 3, 1]


def test_max_bytes_bounds_each_key(counting: Counting) -> None:
    c = cache(counting, max_bytes=100)
    keys = [c.lend(GENERAL, 40)[0] for _ in range(5)]
    assert counting.calls["generate"] == 3
    assert keys[0] is keys[1] and keys[1] is not keys[2] and keys[2] is keys[3]


def test_message_larger_than_max_bytes_gets_its_own_key_and_leaves_the_entry(counting: Counting) -> None:
    c = cache(counting, max_bytes=100)
    shared = c.lend(GENERAL, 10)[0]
    big = c.lend(GENERAL, 101)[0]
    assert big is not shared
    assert c.lend(GENERAL, 10)[0] is shared
    assert counting.calls["generate"] == 2


def test_max_age_retires_a_key(counting: Counting) -> None:
    clock = Clock()
    c = cache(counting, clock, max_age=60)
    first = c.lend(GENERAL, 1)[0]
    clock.now += 59.9
    assert c.lend(GENERAL, 1)[0] is first
    clock.now += 0.2
    assert c.lend(GENERAL, 1)[0] is not first
    assert counting.calls["generate"] == 2


def test_reuse_false_calls_the_keyring_every_time(counting: Counting) -> None:
    c = cache(counting, reuse=False)
    keys = [c.lend(GENERAL, 1)[0] for _ in range(4)]
    assert len({id(k) for k in keys}) == 4
    assert counting.calls["generate"] == 4


def test_unconfigured_classification_is_not_cached(counting: Counting) -> None:
    c = cache(counting)
    request = KeyRequest("pii", "local:pii", {})
    c.generate(request)
    c.generate(request)
    assert counting.calls["generate"] == 2


def test_limits_never_exceed_the_aes_gcm_bound() -> None:
    with pytest.raises(InvalidInput):
        CacheLimits(max_messages=2**32 + 1)


def test_partition_follows_the_context_bound_at_the_key_service(counting: Counting) -> None:
    c = cache(counting)
    a = c.generate(KeyRequest("general", "local:general", {"tenant": "a"}))
    b = c.generate(KeyRequest("general", "local:general", {"tenant": "b"}))
    a_again = c.generate(KeyRequest("general", "local:general", {"tenant": "a"}))
    other_key = c.generate(KeyRequest("general", "local:pii", {"tenant": "a"}))
    assert a is a_again and a is not b and other_key is not a


def test_context_keys_not_sent_to_kms_share_a_key(keyring: LocalKeyring) -> None:
    policy = Policy(
        [ClassPolicy("general", "local:general", kms_context_keys=frozenset({"tenant"}), cache=CacheLimits())]
    )
    counting = Counting(keyring)
    guard = Guard(policy, CachingKeyring(counting, policy))
    one = guard.encrypt(b"x", "general", {"tenant": "a", "row": "1"})
    two = guard.encrypt(b"y", "general", {"tenant": "a", "row": "2"})
    assert counting.calls["generate"] == 1
    assert guard.decrypt(one, {"row": "1"}) == b"x" and guard.decrypt(two, {"row": "2"}) == b"y"
    assert guard.inspect(one).context == {"tenant": "a", "row": "1"}


# ---------------------------------------------------------------------- decrypt side


def test_envelopes_sharing_a_data_key_cost_one_unwrap(keyring: LocalKeyring) -> None:
    policy = Policy.defaults({n: f"local:{n}" for n in ("general", "pii", "payment")})
    counting = Counting(keyring)
    guard = Guard(policy, CachingKeyring(counting, policy))
    sealed = [guard.encrypt(b"m%d" % i, "pii", {"user": "7"}) for i in range(50)]
    assert counting.calls["generate"] == 1
    assert [guard.decrypt(s, {"user": "7"}) for s in sealed] == [b"m%d" % i for i in range(50)]
    assert counting.calls["unwrap"] == 1


def test_decrypt_ttl_expires_and_zero_disables(counting: Counting) -> None:
    clock = Clock()
    c = cache(counting, clock, decrypt_ttl=30)
    wrapped = counting.inner.generate(GENERAL).wrapped
    first = c.unwrap(wrapped, GENERAL)
    assert c.unwrap(wrapped, GENERAL) is first
    clock.now += 31
    assert c.unwrap(wrapped, GENERAL) is not first
    assert counting.calls["unwrap"] == 2

    off = cache(counting, decrypt_ttl=0)
    off.unwrap(wrapped, GENERAL)
    off.unwrap(wrapped, GENERAL)
    assert counting.calls["unwrap"] == 4


def test_decrypt_entries_are_partitioned_by_context(counting: Counting) -> None:
    c = cache(counting)
    wrapped = counting.inner.generate(GENERAL).wrapped
    c.unwrap(wrapped, GENERAL)
    with pytest.raises(envelope.InvalidCiphertext):  # KMS would refuse another context too
        c.unwrap(wrapped, KeyRequest("general", "local:general", {"tenant": "b"}))


# ---------------------------------------------------------------------- single flight


@pytest.mark.parametrize("side", ["generate", "unwrap"])
def test_sixteen_concurrent_misses_make_one_call(counting: Counting, side: str) -> None:
    c = cache(counting)
    wrapped = counting.inner.generate(GENERAL).wrapped
    results: list[DataKey] = []

    def worker() -> None:
        results.append(c.lend(GENERAL, 1)[0] if side == "generate" else c.unwrap(wrapped, GENERAL))

    concurrently(counting, 16, worker)
    assert len(results) == 16 and len({id(k) for k in results}) == 1
    assert counting.calls[side] == 1
    stats = c.stats()
    assert (stats.misses, stats.hits) == (1, 15)


def test_a_failed_call_reaches_every_waiter_and_is_not_cached(counting: Counting) -> None:
    c = cache(counting)
    counting.fail = KeyDisabled("local key 'general' v1 is disabled")
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            c.lend(GENERAL, 1)[0]
        except KeyDisabled as exc:
            errors.append(exc)

    concurrently(counting, 4, worker)
    assert len(errors) == 4
    counting.fail = None
    c.lend(GENERAL, 1)[0]
    assert c.stats().entries == 1


def test_waiters_of_a_throttled_call_try_again_instead_of_failing(counting: Counting) -> None:
    c = cache(counting)
    counting.fail_next = [RateLimited("KMS throttled the request")]
    outcomes: list[str] = []

    def worker() -> None:
        try:
            c.lend(GENERAL, 1)[0]
            outcomes.append("ok")
        except RateLimited:
            outcomes.append("throttled")

    concurrently(counting, 4, worker)
    assert sorted(outcomes) == ["ok", "ok", "ok", "throttled"]
    assert counting.calls["generate"] == 2


# ---------------------------------------------------------------------- eviction and reporting


def test_lru_eviction_drops_the_key_everywhere(counting: Counting) -> None:
    telemetry = Recorder()
    c = CachingKeyring(counting, {"general": CacheLimits()}, max_entries=2, telemetry=telemetry, clock=Clock())
    requests = [KeyRequest("general", "local:general", {"n": str(i)}) for i in range(3)]
    first, budget = c.lend(requests[0], 0)
    assert budget is not None and c.generate(requests[0]) is first
    c.generate(requests[1])
    assert budget.claim(0) is not None  # a use through a plan's lane touches 0: 1 is the least recently used
    c.generate(requests[2])  # evicts 1
    assert c.stats().entries == 2 and c.stats().evictions == 1
    c.generate(requests[0])
    assert counting.calls["generate"] == 3
    c.generate(requests[1])  # it was evicted: a fresh call
    assert counting.calls["generate"] == 4
    assert ("evict", "general") in telemetry.events
    c.clear()
    assert c.stats().entries == 0 and budget.aead is None  # no lane can use the key any more
    assert c.lend(requests[0], 0)[0] is not first


def test_expired_keys_leave_memory_at_the_next_miss(counting: Counting) -> None:
    clock = Clock()
    c = cache(counting, clock, max_age=10, decrypt_ttl=10)
    budget = c.lend(GENERAL, 0)[1]
    assert budget is not None
    clock.now += 11
    c.generate(KeyRequest("general", "local:general", {"tenant": "other"}))
    stats = c.stats()
    assert (stats.entries, stats.retired, stats.evictions) == (1, 1, 0)
    assert budget.aead is None and not budget.live


def test_reports_hits_and_misses_to_telemetry_and_the_operation(keyring: LocalKeyring) -> None:
    policy = Policy.defaults({n: f"local:{n}" for n in ("general", "pii", "payment")})
    telemetry = Recorder()
    finished: list[OperationEvent] = []

    class Collect:
        def observe(self, op: OperationEvent) -> None:
            finished.append(op)

    guard = Guard(policy, CachingKeyring(keyring, policy, telemetry=telemetry), observers=[Collect()])
    sealed = guard.encrypt(b"a", "general")
    guard.encrypt(b"b", "general")
    guard.decrypt(sealed)
    guard.decrypt(sealed)
    assert [op.cache_hit for op in finished] == [False, True, False, True]
    assert telemetry.events == [("miss", "general"), ("miss", "general")]
    [hits] = telemetry.hit_sources  # hits are counted by the cache, read when exported
    assert hits() == {"general": 2}
    guard.encrypt(b"c", "general")  # through the lane: counted all the same
    assert isinstance(guard.keyring, CachingKeyring)
    guard.keyring.clear()
    assert hits() == {"general": 3}  # retired entries' hits are kept


def test_from_env_caches_by_default(guard: Guard) -> None:
    assert isinstance(guard.keyring, CachingKeyring)
    assert isinstance(guard.keyring.inner, LocalKeyring)  # key management reaches the local keyring
    assert backend_of(guard.keyring) is guard.keyring.inner
