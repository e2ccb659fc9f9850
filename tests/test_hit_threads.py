"""Cache hits from many threads at once: the limits, nonces and observation of the hit path.

These run on whichever build is installed (``make test`` runs them compiled and, with
``KMSGUARD_PURE=1``, as plain Python): the same concurrency model holds in both. A lane
is replaced every few messages here (a small ``max_messages``), so threads take lanes that
other threads are swapping out, claim Budgets that run out under them, and draw nonces
across refills.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from kmsguard import Guard, envelope, nonces
from kmsguard.fastpath import OperationEvent
from kmsguard.keyrings.caching import CachingKeyring
from kmsguard.keyrings.local import KEY_FILE_NAME, LocalKeyring
from kmsguard.policy import CacheLimits, Policy

NAMES = ("general", "pii", "payment")
THREADS = 8
PER_THREAD = 300
MAX_MESSAGES = 7


class Recorder:
    """An observer that keeps every event (a list's append is one step, threads or not)."""

    def __init__(self) -> None:
        self.events: list[OperationEvent] = []

    def observe(self, event: OperationEvent) -> None:
        self.events.append(event)


def make_guard(tmp_path: Path, observers: list[Recorder]) -> Guard:
    keyring = LocalKeyring.create(tmp_path / KEY_FILE_NAME, NAMES)
    policy = Policy.defaults({n: f"local:{n}" for n in NAMES})
    policy = policy.with_class(
        replace(policy.get("general"), cache=CacheLimits(max_messages=MAX_MESSAGES, max_age=3600.0))
    )
    return Guard(policy, CachingKeyring(keyring, policy), observers=observers)


def run_threads(work: Callable[[int], list[bytes]]) -> list[list[bytes]]:
    results: list[list[bytes]] = [[] for _ in range(THREADS)]
    errors: list[BaseException] = []
    start = threading.Barrier(THREADS)

    def run(i: int) -> None:
        start.wait()
        try:
            results[i] = work(i)
        except BaseException as exc:  # reported below, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    return results


@pytest.fixture
def small_draws(monkeypatch: pytest.MonkeyPatch) -> None:
    """Refill the nonce pool every few nonces, so that refills race with the hits."""
    monkeypatch.setattr(nonces, "NONCES_PER_DRAW", 5)


@pytest.mark.parametrize("observed", [False, True], ids=["unobserved", "observed"])
def test_threads_never_use_a_data_key_past_its_limit_nor_a_nonce_twice(
    tmp_path: Path, racy: None, small_draws: None, observed: bool
) -> None:
    recorder = Recorder()
    guard = make_guard(tmp_path, [recorder] if observed else [])
    context = {"tenant": "t-1"}

    def encrypt(i: int) -> list[bytes]:
        return [guard.encrypt(f"{i}:{n}".encode(), "general", context) for n in range(PER_THREAD)]

    results = run_threads(encrypt)
    sealed = [data for out in results for data in out]
    assert len(sealed) == THREADS * PER_THREAD
    parsed = [envelope.parse(data) for data in sealed]
    per_key = Counter(env.wrapped_keys[0].wrapped for env in parsed)
    assert max(per_key.values()) <= MAX_MESSAGES  # never one message past the limit
    assert sum(per_key.values()) == len(sealed)
    assert len(per_key) >= len(sealed) / MAX_MESSAGES
    nonce_of = [
        data[env.body_offset - envelope.NONCE_SIZE : env.body_offset] for env, data in zip(parsed, sealed, strict=True)
    ]
    assert len(set(nonce_of)) == len(sealed)  # every nonce once
    for i, out in enumerate(results):
        for n in (0, PER_THREAD // 2, PER_THREAD - 1):
            assert guard.decrypt(out[n], context) == f"{i}:{n}".encode()
    if observed:  # one event per operation, hits and full route alike, every one a success
        encrypts = [e for e in recorder.events if e.operation == "encrypt"]
        assert len(encrypts) == len(sealed)
        assert {e.outcome for e in encrypts} == {"ok"}
        assert len({e.request_id for e in encrypts}) == len(encrypts)


def test_threads_decrypting_through_lanes_get_their_own_plaintext_and_one_event_each(
    tmp_path: Path, racy: None
) -> None:
    recorder = Recorder()
    guard = make_guard(tmp_path, [recorder])
    context = {"tenant": "t-1", "region": "eu"}
    messages = [f"message {n}".encode() for n in range(3 * MAX_MESSAGES)]  # several data keys
    sealed = [guard.encrypt(m, "general", context) for m in messages]
    callers = [context, {"tenant": "t-1"}, {"region": "eu", "tenant": "t-1"}]  # three kinds of caller

    def decrypt(i: int) -> list[bytes]:
        given = callers[i % len(callers)]
        return [guard.decrypt(sealed[n % len(sealed)], given) for n in range(PER_THREAD)]

    results = run_threads(decrypt)
    for out in results:
        assert out == [messages[n % len(messages)] for n in range(PER_THREAD)]
    decrypts = [e for e in recorder.events if e.operation == "decrypt"]
    assert len(decrypts) == THREADS * PER_THREAD
    # Each event carries its own caller's context, in the caller's order, hits included.
    seen = Counter(tuple(e.context.items()) for e in decrypts)
    expected = Counter(tuple(callers[i % len(callers)].items()) for i in range(THREADS) for _ in range(PER_THREAD))
    assert seen == expected
