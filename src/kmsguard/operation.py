"""What happened during one Guard operation, and the observers that are told of it.

Guard opens an :class:`Operation` around every encrypt, decrypt and rewrap that takes the
full route, and makes it the *current* operation (a context variable, so threads and
batch workers each see their own). Keyrings deep in the stack report into it with
:func:`note_kms_call` and :func:`note_cache` without knowing who listens. Finished, it
becomes one :class:`~kmsguard.fastpath.OperationEvent`, which every :class:`Observer`
(the audit writer, the metrics registry, a user's own) receives: one call per
operation, cache hits served by a plan's lane included. With no observers, Guard skips
all of it and these calls are a context-variable read.

Events carry names, counts and the context (never secret: every envelope carries it in
its unencrypted header, see FORMAT.md); never plaintext, ciphertext bodies or keys.
"""

from __future__ import annotations

import copy
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from types import MappingProxyType
from typing import Protocol, runtime_checkable

from kmsguard.fastpath import EventSink, HitSink, OperationEvent, next_request

#: Request ids are ``<process prefix><counter>``: unique, and cheap enough to make for
#: every operation, cache hits included (a uuid4 each would not be); the numbers come
#: from kmsguard.fastpath.next_request.
REQUEST_PREFIX = os.urandom(6).hex()


def request_id_of(number: int) -> str:
    return f"{REQUEST_PREFIX}{number:010x}"


def _new_prefix_in_child() -> None:
    """A forked child continues its parent's counter: a prefix of its own keeps its ids apart."""
    global REQUEST_PREFIX
    REQUEST_PREFIX = os.urandom(6).hex()


os.register_at_fork(after_in_child=_new_prefix_in_child)


class Operation:
    """One operation's record while it runs on the full route; Guard's, never an observer's.

    Guard and the keyrings below it note into it; finished, :meth:`event` is what the
    observers get. A plain class with ``__slots__`` rather than a dataclass: one is built
    per observed operation, so its construction is cost on that route. ``strict_audit``
    is the policy's, set by Guard. The request id is numbered only when first asked for.
    """

    __slots__ = (
        "_request_number",
        "_t0",
        "cache_hit",
        "classification",
        "context",
        "duration",
        "error_code",
        "key_refs",
        "kms_calls",
        "lane",
        "name",
        "outcome",
        "principal",
        "regions",
        "size",
        "started_at",
        "strict_audit",
    )

    def __init__(
        self,
        name: str,
        classification: str | None,
        context: Mapping[str, str],
        principal: str,
        strict_audit: bool = False,
    ) -> None:
        self.name = name
        self.classification = classification
        self.context = context
        self.principal = principal
        self.strict_audit = strict_audit
        self._request_number = 0
        self.started_at = time.time()
        self.key_refs: list[str] = []
        self.regions: list[str] = []
        self.kms_calls = 0
        self.cache_hit: bool | None = None
        self.outcome = "pending"
        self.error_code: str | None = None
        self.duration = 0.0
        self.size = 0
        #: The plan's lane (kmsguard.plans.Lane) whose cached key served this operation, if any.
        self.lane: object = None
        self._t0 = time.perf_counter()

    @property
    def request_id(self) -> str:
        """The audit record's request id: the caller's own inside ``serving(<str>)``, else one made here."""
        served = request.get()
        if isinstance(served, str):
            return served
        return request_id_of(self.request_number())

    def request_number(self) -> int:
        """The process' request number in this operation's id; the audit writer spools the number.

        Inside :func:`serving` it is the front-end request's number, so every operation
        of one HTTP request carries that request's id; 0 when that request has the
        caller's own id (:attr:`request_id` is then that text).
        """
        number = self._request_number
        if number == 0:
            served = request.get()
            if isinstance(served, str):
                return 0
            number = self._request_number = served or next_request()
        return number

    def event(self) -> OperationEvent:
        """The finished operation as observers receive it (a new EventKind of its own)."""
        served = request.get()
        caller_id = served if isinstance(served, str) else None
        number = self.request_number()
        return OperationEvent(EventKind(self), self.started_at, self.duration, self.size, number, caller_id)

    def finish(self, error: BaseException | None) -> None:
        self.duration = time.perf_counter() - self._t0
        if error is None:
            self.outcome = "ok"
        else:
            self.outcome = "error"
            self.error_code = getattr(error, "code", "INTERNAL_ERROR")

    def __repr__(self) -> str:
        return f"Operation({self.name!r}, {self.classification!r}, outcome={self.outcome!r})"


class EventKind:
    """What every operation of one kind shares: all of an OperationEvent but start, duration, size and request.

    Built from a finished Operation; never changed. Once an operation has been served from
    the cache with no key-service call, Guard keeps its EventKind on the plan's lane that
    served it (kmsguard.plans); later operations of that kind are served by the lane and
    reported with the same kind, so a hit is recorded exactly as that operation was.
    ``shape`` is the same facts as one tuple in the audit record's order
    (kmsguard.audit.facts.Shape), which the audit writer spools once per kind.
    """

    __slots__ = (
        "cache_hit",
        "classification",
        "context",
        "error_code",
        "key_refs",
        "kms_calls",
        "operation",
        "outcome",
        "principal",
        "regions",
        "shape",
        "strict",
    )

    def __init__(self, op: Operation) -> None:
        self.operation = op.name
        self.classification = op.classification
        self.principal = op.principal
        self.outcome = op.outcome
        self.error_code = op.error_code
        self.cache_hit = op.cache_hit
        self.kms_calls = op.kms_calls
        self.key_refs = tuple(op.key_refs)
        self.regions = tuple(op.regions)
        self.context: Mapping[str, str] = MappingProxyType(dict(op.context))
        self.strict = op.strict_audit
        self.shape = (
            self.operation,
            self.classification,
            self.key_refs,
            self.regions,
            self.principal,
            self.outcome,
            self.error_code,
            self.kms_calls,
            self.cache_hit,
            tuple(self.context.items()),
        )

    def refused(self, error_code: str) -> EventKind:
        """This kind as an error: what the observers after a strict refusal see (see Guard)."""
        kind = copy.copy(self)
        kind.outcome, kind.error_code = "error", error_code
        kind.shape = (*self.shape[:5], "error", error_code, *self.shape[7:])
        return kind

    def __repr__(self) -> str:
        return f"EventKind({self.operation!r}, {self.classification!r}, outcome={self.outcome!r})"


@runtime_checkable
class Observer(Protocol):
    """Receives one :class:`~kmsguard.fastpath.OperationEvent` per finished operation.

    ``observe`` runs in the caller's thread, after the operation's work and before it
    returns, cache hits included: it must be quick and must not block (hand slow work to
    a thread of its own, as the audit writer does). It reports a failure by raising; it
    never changes the event. What a raise does is Guard's decision, from the policy: an
    operation whose classification has strict audit (``event.strict``) is refused with
    AuditUnavailable, and the observers after it see it refused; on any other
    operation the failure is logged (logger ``kmsguard``) and the result stands.
    For an operation on the full route, :data:`current` is still that operation while
    ``observe`` runs (so what was noted under it can be related to the event); for a
    cache hit served by a plan's lane there is no Operation (current is left as it was).
    """

    def observe(self, event: OperationEvent) -> None: ...


@runtime_checkable
class HitObserver(Protocol):
    """An Observer that records cache hits through a compiled sink of its own (audit, metrics).

    ``hit_recorder()`` returns the HitSink whose ``record(kind, started, duration, size,
    request)`` takes each hit instead of ``observe`` -- the same facts, without building an
    event -- or None when this observer records nothing for hits. Any other observer gets
    hits as events (kmsguard.fastpath.EventSink).
    """

    def hit_recorder(self) -> HitSink | None: ...


def hit_sink(observer: Observer, report: Callable[[BaseException], None]) -> HitSink | None:
    """How cache hits reach ``observer``: its own sink, or its ``observe`` through an EventSink."""
    if isinstance(observer, HitObserver):
        return observer.hit_recorder()
    return EventSink(observer.observe, report)


current: ContextVar[Operation | None] = ContextVar("kmsguard_operation", default=None)

#: Who the current code acts for, when that is not the Guard's own principal (see acting_as).
principal: ContextVar[str | None] = ContextVar("kmsguard_principal", default=None)


@contextmanager
def acting_as(who: str) -> Iterator[None]:
    """Record the operations in this block as done by ``who`` (an end user, an API key's owner).

    A front end serving many callers with one Guard says whom each request is for; audit
    records then name that caller instead of the Guard's configured principal.
    """
    token = principal.set(who)
    try:
        yield
    finally:
        principal.reset(token)


#: The front-end request the current code serves (see serving): its number (an id made by
#: request_id_of), or the caller's own request id (text). Guard's plans' lanes read it too:
#: the audit writer's hit recorder (kmsguard.audit.frames.HitWriter) records hits under it.
request: ContextVar[int | str | None] = ContextVar("kmsguard_request", default=None)


def new_request_id() -> tuple[int, str]:
    """A request number and its id (``request_id_of``), for a front end to give one request."""
    number = next_request()
    return number, request_id_of(number)


@contextmanager
def serving(request_id: int | str) -> Iterator[None]:
    """Record the operations in this block under one request id: a number from
    :func:`new_request_id`, or a caller's own id (a str that
    kmsguard.audit.record.check_request_id accepts; anything else raises InvalidInput).

    The HTTP service runs each HTTP request's operations in this block under the caller's
    ``X-Request-Id`` (or one it made) and answers it, so the audit records of the
    request, cache hits included, carry that id.
    """
    if isinstance(request_id, str):
        from kmsguard.audit.record import check_request_id  # the record's rule; audit imports this module

        check_request_id(request_id)
    token = request.set(request_id)
    try:
        yield
    finally:
        request.reset(token)


#: The monotonic time by which the current keyring operation must end, across every
#: region and retry. The multi-region keyring sets it; the AWS client factory bounds
#: each call by it, so failing over never outlives the caller's deadline.
deadline: ContextVar[float | None] = ContextVar("kmsguard_operation_deadline", default=None)


#: Serialises notes into one Operation: a multi-region keyring's tries (a
#: hedge, the copies of wrap_in_all_regions) report from several threads at once.
_notes = threading.Lock()


def note_kms_call(key_ref: str | None = None, region: str | None = None) -> None:
    """A keyring called its key service once (retries are counted by the AWS layer). Thread-safe."""
    op = current.get()
    if op is None:
        return
    with _notes:
        op.kms_calls += 1
        if key_ref and key_ref not in op.key_refs:
            op.key_refs.append(key_ref)
        if region and region not in op.regions:
            op.regions.append(region)


def note_cache(hit: bool) -> None:
    """A caching keyring served (hit) or missed this operation's data key."""
    op = current.get()
    if op is not None:
        op.cache_hit = hit if op.cache_hit is None else op.cache_hit and hit
