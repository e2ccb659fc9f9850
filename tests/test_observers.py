"""The observer interface: one OperationEvent per operation, cache hits included; a raise is
reported, and refuses a strict operation only (Guard's decision, from the policy)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from kmsguard import Guard, operation
from kmsguard.config import load_settings
from kmsguard.errors import AuditUnavailable
from kmsguard.fastpath import OperationEvent
from kmsguard.keyrings.caching import CachingKeyring
from kmsguard.keyrings.local import LocalKeyring
from kmsguard.policy import Policy
from kmsguard.stack import build_policy

NAMES = ("general", "pii", "payment")


class Collect:
    def __init__(self) -> None:
        self.events: list[OperationEvent] = []

    def observe(self, event: OperationEvent) -> None:
        self.events.append(event)


class Fails(Collect):
    def observe(self, event: OperationEvent) -> None:
        super().observe(event)
        raise RuntimeError("observer down")


@pytest.fixture
def policy() -> Policy:
    return Policy.defaults({n: f"local:{n}" for n in NAMES})


def test_each_operation_is_one_event_and_cache_hits_share_their_kind(keyring: LocalKeyring, policy: Policy) -> None:
    seen = Collect()
    guard = Guard(policy, CachingKeyring(keyring, policy), observers=[seen], principal="svc")
    context = {"tenant": "t-1"}
    sealed = [guard.encrypt(b"x" * n, "general", context) for n in (10, 20, 30, 40)]
    for token in sealed:
        assert guard.decrypt(token, context)
    events = seen.events
    assert [(e.operation, e.cache_hit, e.kms_calls, e.size) for e in events] == [
        ("encrypt", False, 0, 10), ("encrypt", True, 0, 20), ("encrypt", True, 0, 30), ("encrypt", True, 0, 40),
        ("decrypt", False, 0, 10), ("decrypt", True, 0, 20), ("decrypt", True, 0, 30), ("decrypt", True, 0, 40),
    ]
    for e in events:
        assert (e.classification, e.outcome, e.error_code, e.principal) == ("general", "ok", None, "svc")
        assert not e.strict
        assert dict(e.context) == context and e.key_refs == ("local:general:v1",) and e.duration > 0
    # The third and fourth of each were served by the plan's lane: reported with the kind the second taught it.
    assert events[2].kind is events[1].kind and events[3].kind is events[1].kind
    assert events[6].kind is events[5].kind and events[7].kind is events[5].kind
    requests = [e.request for e in events]
    assert len(set(requests)) == len(requests) and len({e.request_id for e in events}) == len(events)


def test_events_carry_the_served_request_on_the_full_route_and_on_hits(keyring: LocalKeyring, policy: Policy) -> None:
    seen = Collect()
    guard = Guard(policy, CachingKeyring(keyring, policy), observers=[seen])
    number, text = operation.new_request_id()
    with operation.serving(number):
        for _ in range(3):  # a miss, a hit on the full route, a hit served by the lane
            guard.encrypt(b"x", "general")
    with operation.serving("caller-req-42"):
        for _ in range(2):
            guard.encrypt(b"x", "general")
    assert [(e.request, e.caller_id, e.request_id) for e in seen.events] == [
        *[(number, None, text)] * 3,
        *[(0, "caller-req-42", "caller-req-42")] * 2,
    ]
    assert seen.events[2].kind is seen.events[1].kind  # the lane's hit


def test_a_failing_observer_on_a_non_strict_operation_is_logged_and_the_result_stands(
    keyring: LocalKeyring, policy: Policy, caplog: pytest.LogCaptureFixture
) -> None:
    failing, after = Fails(), Collect()
    guard = Guard(policy, CachingKeyring(keyring, policy), observers=[failing, after])
    with caplog.at_level(logging.ERROR, logger="kmsguard"):
        sealed = [guard.encrypt(b"data", "general") for _ in range(4)]  # full route, then the lane
    assert all(guard.decrypt(token) == b"data" for token in sealed)
    assert len(failing.events) == len(after.events) == 8
    assert all(e.outcome == "ok" for e in after.events)
    assert [r.getMessage() for r in caplog.records][:4] == ["an observer failed: RuntimeError('observer down')"] * 4


def test_a_failing_observer_refuses_a_strict_operation_and_later_observers_see_it_refused(
    keyring: LocalKeyring, policy: Policy
) -> None:
    before, failing, after = Collect(), Fails(), Collect()
    guard = Guard(policy, CachingKeyring(keyring, policy), observers=[before, failing, after])
    for _ in range(3):  # strict: never a lane's, every time refused
        with pytest.raises(AuditUnavailable) as info:
            guard.encrypt(b"4111", "payment", {"purpose": "refund"})
        assert isinstance(info.value.__cause__, RuntimeError)
    assert [(e.strict, e.outcome, e.error_code) for e in before.events] == [(True, "ok", None)] * 3
    assert [(e.outcome, e.error_code) for e in after.events] == [("error", "AUDIT_UNAVAILABLE")] * 3
    assert after.events[0].request == before.events[0].request  # the same operation, refused


def test_audit_strict_in_the_settings_makes_every_classification_strict(home: Path, keyring: LocalKeyring) -> None:
    (home / "kmsguard.toml").write_text('[audit]\nstrict = true\nsink = "none"\n')
    policy = build_policy(load_settings({"KMSGUARD_HOME": str(home)}))
    assert all(cls.strict_audit for cls in policy)
    (home / "kmsguard.toml").write_text('[audit]\nstrict = false\nsink = "none"\n')
    with Guard.from_env({"KMSGUARD_HOME": str(home)}) as guard:  # audit off, nothing strict: payment served
        assert guard.decrypt(guard.encrypt(b"4111", "payment", {"purpose": "r"}), {"purpose": "r"}) == b"4111"
