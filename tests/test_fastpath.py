"""Budgets (kmsguard.fastpath) and the plans' lanes (kmsguard.plans): compiled, exact limits, and
never a decision of their own.

Every lane test compares with what the full route does: a lane either gives the same
result or steps aside (None), and the cache's limits hold across both routes.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kmsguard import (
    ContextMismatch,
    ContextRequired,
    Guard,
    InvalidCiphertext,
    InvalidInput,
    envelope,
    fastpath,
    plans,
    pure,
)
from kmsguard.keyrings.caching import CachingKeyring
from kmsguard.keyrings.local import KEY_FILE_NAME, LocalKeyring
from kmsguard.policy import CacheLimits, Policy

NAMES = ("general", "pii", "payment")


def _source_module(compiled: ModuleType) -> ModuleType:
    """A compiled module's .py imported as plain Python, as it runs where no compiler built it."""
    name = compiled.__name__.rsplit(".", 1)[1]
    source = Path(compiled.__file__).with_name(f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"kmsguard_{name}_source", source)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(params=["compiled", "source"])
def fp(request: pytest.FixtureRequest) -> ModuleType:
    return fastpath if request.param == "compiled" else _source_module(fastpath)


@pytest.fixture(params=["compiled", "source"])
def pl(request: pytest.FixtureRequest) -> ModuleType:
    return plans if request.param == "compiled" else _source_module(plans)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_installed_build_compiled_the_hot_path_unless_kmsguard_pure_asks_for_python() -> None:
    """setup.py's extensions are optional; a build that silently fell back to Python fails here.

    With KMSGUARD_PURE=1 (noxfile.py's tests-pure session) every one runs from its source."""
    from kmsguard import histogram, nonces
    from kmsguard.audit import frames

    modules = (fastpath, plans, nonces, histogram, frames)
    assert sorted(m.__name__ for m in modules) == sorted(pure.MODULES)
    compiled = not pure.requested()
    for module in modules:
        assert module.__file__.endswith(".py") is not compiled, f"{module.__name__} from {module.__file__}"
    assert {fastpath.COMPILED, plans.COMPILED, histogram.COMPILED, frames.COMPILED} == {compiled}
    assert not _source_module(fastpath).COMPILED and not _source_module(plans).COMPILED


def test_kmsguard_pure_imports_every_compiled_module_from_its_source() -> None:
    probe = (
        "import kmsguard.fastpath, kmsguard.plans, kmsguard.nonces, kmsguard.histogram, kmsguard.audit.frames, sys\n"
        "print(sorted(n for n in sys.modules if n.startswith('kmsguard') and sys.modules[n].__file__.endswith('.py')"
        " and hasattr(sys.modules[n], 'COMPILED') and not sys.modules[n].COMPILED))"
    )
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True,
                         env={**os.environ, "KMSGUARD_PURE": "1"}).stdout
    assert out.strip() == str(sorted(pure.MODULES))


def test_pure_names_the_modules_setup_py_compiles() -> None:
    setup = ast.parse((Path(__file__).parent.parent / "setup.py").read_text())
    [modules] = [n.value for n in setup.body if isinstance(n, ast.Assign) and ast.unparse(n.targets[0]) == "MODULES"]
    assert ast.literal_eval(modules) == pure.MODULES


def test_budget_counts_messages_bytes_and_age(fp: ModuleType) -> None:
    clock = Clock()
    aead = object()
    budget = fp.Budget(aead, clock, expires=1010.0, max_messages=3, max_bytes=100, first_size=10)
    assert budget.claim(50) is aead  # message 2, 60 bytes
    assert budget.claim(41) is None  # 101 bytes: over the byte budget
    assert budget.claim(40) is aead  # message 3, 100 bytes
    assert budget.claim(0) is None  # a 4th message is over max_messages
    assert (budget.messages, budget.nbytes, budget.hits) == (3, 100, 2)

    young = fp.Budget(aead, clock, expires=1010.0)
    assert young.claim(0) is aead
    clock.now = 1010.0
    assert young.claim(0) is None


def test_a_retired_budget_gives_nothing_and_holds_no_key(fp: ModuleType) -> None:
    budget = fp.Budget(object(), Clock(), expires=2000.0)
    budget.retire()
    assert budget.claim(0) is None
    assert budget.aead is None and not budget.live


def test_sixteen_threads_never_claim_past_the_limit(fp: ModuleType, racy: None) -> None:
    budget = fp.Budget(object(), Clock(), expires=2000.0, max_messages=5000, max_bytes=10**9)
    granted = [0] * 16
    start = threading.Barrier(16)

    def claim(i: int) -> None:
        start.wait()
        for _ in range(1000):
            if budget.claim(1) is not None:
                granted[i] += 1

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(granted) == 4999  # the first message is the fetching caller's
    assert budget.messages == 5000 and budget.nbytes == 4999


def test_last_use_orders_budgets(fp: ModuleType) -> None:
    a = fp.Budget(object(), Clock(), expires=2000.0)
    b = fp.Budget(object(), Clock(), expires=2000.0)
    assert a.last_used < b.last_used
    a.claim(0)
    assert a.last_used > b.last_used


# ---------------------------------------------------------------------- through Guard


@pytest.fixture
def local(tmp_path: Path) -> LocalKeyring:
    return LocalKeyring.create(tmp_path / KEY_FILE_NAME, NAMES)


def make_guard(keyring: LocalKeyring, clock: Clock | None = None, **limits: Any) -> Guard:
    policy = Policy.defaults({n: f"local:{n}" for n in NAMES})
    if limits:
        policy = policy.with_class(replace(policy.get("general"), cache=CacheLimits(**limits)))
    cache = CachingKeyring(keyring, policy, clock=clock or Clock())
    return Guard(policy, cache)


def lane_of(guard: Guard) -> plans.Lane:
    lane = next(iter(guard._plans.encrypt.items.values())).lane
    assert lane is not None
    return lane


def wrapped_of(data: bytes) -> bytes:
    return envelope.parse(data).wrapped_keys[0].wrapped


def test_hits_take_a_lane_and_open_like_the_full_path(local: LocalKeyring) -> None:
    guard = make_guard(local)
    ctx = {"tenant": "t-1"}
    first = guard.encrypt(b"one", "general", ctx)
    assert len(guard._plans.encrypt) == 1
    lane_of(guard)
    second = guard.encrypt(b"two", "general", ctx)  # through the lane
    assert wrapped_of(first) == wrapped_of(second)
    assert guard.decrypt(first, ctx) == b"one"  # full route, lends the decrypt plan its lane
    assert [p.lane is not None for p in guard._plans.decrypt.items.values()] == [True]
    assert guard.decrypt(second, ctx) == b"two"  # through the lane
    fresh = make_guard(local)  # no lanes, no cache: the lane's envelope is a normal one
    assert fresh.decrypt(second, ctx) == b"two"


def test_limits_hold_across_lane_and_full_path(local: LocalKeyring) -> None:
    clock = Clock()
    guard = make_guard(local, clock, max_messages=3, max_age=10.0)
    keys = [wrapped_of(guard.encrypt(b"x", "general")) for _ in range(7)]
    assert keys[0] == keys[1] == keys[2] != keys[3]
    assert keys[3] == keys[4] == keys[5] != keys[6]
    clock.now += 10.0
    assert wrapped_of(guard.encrypt(b"x", "general")) != keys[6]


def test_clearing_the_cache_retires_the_lanes_key(local: LocalKeyring) -> None:
    guard = make_guard(local)
    before = wrapped_of(guard.encrypt(b"x", "general"))
    lane = lane_of(guard)
    assert isinstance(guard.keyring, CachingKeyring)
    guard.keyring.clear()
    assert lane.budget.aead is None  # the lane no longer holds the key object
    assert wrapped_of(guard.encrypt(b"x", "general")) != before


@pytest.fixture
def sealed(local: LocalKeyring) -> Iterator[tuple[Guard, bytes]]:
    guard = make_guard(local)
    data = guard.encrypt(b"card", "payment", {"purpose": "refund", "tenant": "t"})
    assert guard.decrypt(data, {"purpose": "refund"}) == b"card"  # binds the lane
    yield guard, data


def test_a_lane_leaves_every_error_to_the_full_path(sealed: tuple[Guard, bytes]) -> None:
    guard, data = sealed
    assert guard._plans.open(data, {"purpose": "other"}) is None
    with pytest.raises(ContextMismatch):
        guard.decrypt(data, {"purpose": "other"})
    assert guard._plans.open(data, None) is None
    with pytest.raises(ContextRequired):
        guard.decrypt(data)
    assert guard._plans.open(data, ["purpose"]) is None
    assert guard._plans.seal("text", "payment", {"purpose": "refund", "tenant": "t"}) is None


def test_a_forged_body_under_a_bound_prefix_is_invalid(sealed: tuple[Guard, bytes]) -> None:
    guard, data = sealed
    forged = data[:-1] + bytes([data[-1] ^ 1])
    with pytest.raises(InvalidCiphertext):
        guard._plans.open(forged, {"purpose": "refund"})
    with pytest.raises(InvalidCiphertext):
        guard.decrypt(data[:-17], {"purpose": "refund"})  # too short for a tag: the full route says so


def test_an_observed_lane_reports_each_hit_with_its_principal_and_clock(pl: ModuleType) -> None:
    """The clock and context-variable read are C when compiled, stand-ins when not: both must agree."""
    from contextvars import ContextVar

    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    hits: list[tuple[object, float, float, int]] = []
    requests: list[tuple[int, object]] = []

    class Sink(fastpath.HitSink):  # type: ignore[misc]
        def record(self, kind: Any, started: float, duration: float, size: int, request: int, caller: Any) -> None:
            hits.append((kind, started, duration, size))
            requests.append((request, caller))

    acting: ContextVar[str | None] = ContextVar("acting", default=None)
    served: ContextVar[int | str | None] = ContextVar("served", default=None)
    policy = Policy.defaults({n: f"local:{n}" for n in NAMES})
    tables = pl.Plans(policy, observed=True, sinks=(Sink(),), principal="svc", acting=acting, served=served)
    plan = tables.encrypt_plan("general", None)
    lane = plan.install(pl.Lane(fastpath.Budget(AESGCM(bytes(32)), Clock(), expires=2000.0), (), b"prefix", b"aad"))
    pl.bind_kind(lane, "svc", "svc-kind")
    pl.bind_kind(lane, "agent", "agent-kind")
    lanes = tables

    before = time.time()
    assert lanes.seal(b"x" * 10, "general", None) is not None
    token = acting.set("agent")
    assert lanes.seal(b"y" * 20, "general", None) is not None
    acting.set("stranger")
    assert lanes.seal(b"z", "general", None) is None  # no kind for this principal: the full route
    acting.reset(token)
    after = time.time()

    assert [(kind, size) for kind, _, _, size in hits] == [("svc-kind", 10), ("agent-kind", 20)]
    for _, started, duration, _ in hits:
        assert before - 0.01 <= started <= after + 0.01  # wall-clock start, from the lane's own clock
        assert 0 <= duration < after - before + 0.01

    # The lane remembers the last principal's kind; binding another kind for it replaces that.
    assert lanes.seal(b"x", "general", None) is not None
    pl.bind_kind(lane, "svc", "svc-kind-2")
    assert lanes.seal(b"x", "general", None) is not None
    assert [kind for kind, _, _, _ in hits[2:]] == ["svc-kind", "svc-kind-2"]
    numbers = [number for number, caller in requests]
    assert numbers == sorted(set(numbers)) and all(caller is None for _, caller in requests)  # a number per hit

    # Inside a served request: its number, or 0 and the caller's own id, for every hit.
    del requests[:]
    served.set(7)
    assert lanes.seal(b"x", "general", None) is not None
    served.set("caller-id-1")
    assert lanes.seal(b"x", "general", None) is not None
    assert requests == [(7, None), (0, "caller-id-1")]


def test_a_lanes_kinds_stay_within_their_bound_and_a_kind_bound_again_replaces_it(pl: ModuleType) -> None:
    lane = pl.Lane(fastpath.Budget(object(), Clock(), expires=2000.0), ())
    pl.bind_kind(lane, "p", "k1", (("a", "1"),))  # a decrypt lane: by principal, then context items
    pl.bind_kind(lane, "p", "k2", (("a", "1"),))
    pl.bind_kind(lane, "p", "k3", ())
    assert lane.kinds == {"p": (((("a", "1"),), "k2"), ((), "k3"))}
    bound = _source_module(plans).MAX_KINDS_PER_LANE  # compiled, a C constant
    for n in range(bound):
        pl.bind_kind(lane, f"q{n}", "k")
    assert lane.bound == bound
    assert len(lane.kinds) == bound - 1  # "p" holds two of them


@settings(max_examples=150, deadline=None)
@given(
    context=st.dictionaries(st.text(min_size=1, max_size=20), st.text(max_size=40), max_size=5),
    cut=st.integers(0, 400),
)
def test_the_prefix_length_read_from_the_length_fields_is_the_parsed_one(
    shared_guard: Guard, context: dict[str, str], cut: int
) -> None:
    """plans._prefix_len (how a decrypt plan is found) agrees with the parser on every envelope,
    and on a truncated or altered one never finds a plan the parser would not."""
    source = _source_module(plans)
    try:
        sealed = shared_guard.encrypt(b"x" * 10, "general", context)
    except InvalidInput:
        return  # a context the policy refuses (a reserved key, lone surrogates)
    env = envelope.parse(sealed)
    assert source._prefix_len(sealed) == env.body_offset - envelope.NONCE_SIZE
    truncated = sealed[: min(cut, len(sealed) - 1)]
    n = source._prefix_len(truncated)
    assert n == -1 or n + envelope.NONCE_SIZE + envelope.TAG_SIZE <= len(truncated)
    assert shared_guard.decrypt(sealed, context) == b"x" * 10  # the plan and its lane exist now
    try:
        assert shared_guard._plans.open(truncated, context) is None
    except InvalidCiphertext:
        assert n == env.body_offset - envelope.NONCE_SIZE  # the prefix is whole: the body fails its tag


@pytest.fixture(scope="module")
def shared_guard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guard]:
    with make_guard(LocalKeyring.create(tmp_path_factory.mktemp("shared") / KEY_FILE_NAME, NAMES)) as guard:
        yield guard
