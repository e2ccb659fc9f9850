"""Guard.encrypt_many / decrypt_many: one result per item, in order; bad items stay local."""

from __future__ import annotations

import pytest

from kmsguard import Guard, InvalidCiphertext, InvalidInput, KmsGuardError, RateLimited, envelope
from kmsguard.batch import Result
from kmsguard.fastpath import OperationEvent
from kmsguard.keyrings.base import KeyRequest
from kmsguard.keyrings.local import LocalKeyring
from kmsguard.policy import CacheLimits, ClassPolicy, Policy
from test_caching import Counting


def no_cache_guard(keyring: LocalKeyring, observers: list[object] | None = None) -> tuple[Guard, Counting]:
    """A guard whose only reuse is the batch's own: cache off for encrypt and decrypt."""
    counting = Counting(keyring)
    policy = Policy([ClassPolicy("general", "local:general", cache=CacheLimits(reuse=False, decrypt_ttl=0))])
    return Guard(policy, counting, observers=observers or []), counting  # type: ignore[arg-type]


@pytest.mark.parametrize("concurrency", [1, 4])
def test_encrypt_many_keeps_order_and_isolates_bad_items(guard: Guard, concurrency: int) -> None:
    items = [b"a", b"b", "not bytes", b"d"]
    results = guard.encrypt_many(items, "pii", {"user": "1"}, max_concurrency=concurrency)  # type: ignore[arg-type]
    assert [r.ok for r in results] == [True, True, False, True]
    assert isinstance(results[2].error, InvalidInput)
    with pytest.raises(InvalidInput):
        results[2].get()
    assert [guard.decrypt(r.get(), {"user": "1"}) for r in results if r.ok] == [b"a", b"b", b"d"]


def test_encrypt_many_per_item_contexts(guard: Guard) -> None:
    contexts = [{"purpose": "refund"}, {}, {"purpose": "charge"}]
    results = guard.encrypt_many([b"1", b"2", b"3"], "payment", contexts=contexts)
    assert [r.ok for r in results] == [True, False, True]
    assert results[1].error is not None and results[1].error.code == "CONTEXT_REQUIRED"
    assert guard.inspect(results[2].get()).context == {"purpose": "charge"}
    with pytest.raises(InvalidInput):
        guard.encrypt_many([b"1"], "payment", contexts=[])


def test_decrypt_many_unwraps_each_distinct_key_once_even_without_a_cache(keyring: LocalKeyring) -> None:
    guard, counting = no_cache_guard(keyring)
    first = guard.encrypt(b"x", "general")
    second = guard.encrypt(b"y", "general")
    # Ten envelopes under each of two data keys, as a column re-read would hold them.
    request = KeyRequest("general", "local:general", {})
    envelopes = []
    for i in range(10):
        for sealed in (first, second):
            dk = keyring.unwrap(envelope.parse(sealed).wrapped_keys, request)
            envelopes.append(envelope.Sealer(dk, "general", {}).seal(b"m%d" % i))
    counting.calls["unwrap"] = 0
    results = guard.decrypt_many(envelopes, max_concurrency=4)
    assert [r.get() for r in results] == [b"m%d" % (i // 2) for i in range(20)]
    assert counting.calls["unwrap"] == 2


def test_decrypt_many_isolates_bad_envelopes_and_audits_each(keyring: LocalKeyring) -> None:
    finished: list[OperationEvent] = []

    class Collect:
        def observe(self, op: OperationEvent) -> None:
            finished.append(op)

    guard, counting = no_cache_guard(keyring, [Collect()])
    good = guard.encrypt(b"fine", "general")
    tampered = good[:-1] + bytes([good[-1] ^ 1])
    finished.clear()
    results = guard.decrypt_many([good, b"garbage", tampered, "kg1:!!", None, good])  # type: ignore[list-item]
    assert [r.ok for r in results] == [True, False, False, False, False, True]
    assert [type(r.error) for r in results[1:5]] == [InvalidCiphertext] * 3 + [InvalidInput]
    assert [op.outcome for op in finished].count("ok") == 2 and len(finished) == 6
    assert counting.calls["unwrap"] == 1  # the good and the tampered envelope share one data key


def test_a_failed_unwrap_is_shared_by_its_group_not_retried(keyring: LocalKeyring) -> None:
    guard, counting = no_cache_guard(keyring)
    sealed = [guard.encrypt(b"%d" % i, "general") for i in range(3)]
    counting.fail = KmsGuardError("key service down")
    counting.calls["unwrap"] = 0
    results = guard.decrypt_many(sealed, max_concurrency=1)
    assert all(not r.ok for r in results)
    assert counting.calls["unwrap"] == 3  # three distinct data keys (cache off): one attempt each


def test_result_is_value_or_error() -> None:
    assert Result(value=b"x").ok and Result(value=b"x").get() == b"x"
    assert not Result(error=InvalidInput()).ok


def test_a_throttled_unwrap_fails_one_item_not_its_group(keyring: LocalKeyring) -> None:
    guard, counting = no_cache_guard(keyring)
    first = guard.encrypt(b"x", "general")
    request = KeyRequest("general", "local:general", {})
    dk = keyring.unwrap(envelope.parse(first).wrapped_keys, request)
    group = [envelope.Sealer(dk, "general", {}).seal(b"m%d" % i) for i in range(5)]
    counting.calls["unwrap"] = 0
    counting.fail_next = [RateLimited("KMS throttled the request")]
    results = guard.decrypt_many(group, max_concurrency=1)
    assert [r.ok for r in results] == [False, True, True, True, True]
    assert counting.calls["unwrap"] == 2


def test_decrypt_many_leaves_its_data_keys_to_later_cache_hits(guard: Guard) -> None:
    """With the data-key cache on, the batch's unwrap lends the key to its plan: later
    decrypts of envelopes under it are cache hits served on the fast route."""
    sealed = [guard.encrypt(b"m%d" % i, "general", {"t": "1"}) for i in range(5)]
    assert guard.decrypt_if_cached(sealed[0], {"t": "1"}) is None
    expected = [b"m%d" % i for i in range(5)]
    assert [r.get() for r in guard.decrypt_many(sealed, {"t": "1"}, max_concurrency=1)] == expected
    assert [guard.decrypt_if_cached(s, {"t": "1"}) for s in sealed] == expected
