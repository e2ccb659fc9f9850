"""MultiRegionKeyring: several regions in order of preference, failing over without stalling.

A single KMS region is a single point of failure. This keyring holds one keyring per
region (``{"eu-west-1": AwsKmsKeyring(...), "eu-central-1": ...}``, most preferred
first) and, for every operation, uses the first region that is healthy:

* **Multi-region keys** (``mrk-...``): the policy's key ARN is translated into each
  region (the regional keyring does that), so any healthy replica generates data keys
  and decrypts ciphertexts made in any other replica region.
* **Single-region keys**: ``region_keys`` gives each classification a key id per region;
  with ``wrap_in_all_regions`` every new data key is wrapped (Encrypt) in every other
  usable region, in parallel, so any of them can decrypt it later. A region that is
  down at that moment is left out of that envelope rather than failing the encrypt.
* **Circuit breaker per region**: after ``failures`` consecutive transport, timeout or
  5xx failures a region is *open* and skipped for ``cooldown`` seconds; then it is
  *half-open* and exactly one request probes it: success closes it, failure opens it
  again. A dead region therefore costs a few timeouts, not one per request.
* **One deadline per operation** (``operation_timeout``) across every region and
  retry, published in :data:`kmsguard.operation.deadline` so the AWS client factory
  bounds each call by it.
* **A budget per try**: each region's try runs on a worker thread under a deadline of
  its own, a share of the time left (``1/n`` of it with ``n`` regions not yet tried, at
  least ``ATTEMPT_FLOOR``; the last region gets the rest), whatever ``read_timeout``
  says, so a silent region leaves time for the others. A try that runs out of its
  budget counts as a failure for the region's breaker, as a refused connection does.
* **Hedged requests** (``hedge``, a :class:`~kmsguard.keyrings.region_health.HedgePolicy`):
  when the running try has not answered within its region's hedge delay (the region's
  recent p95 latency, between a floor and a cap), the same call goes to the next
  healthy region and the first success wins; the other try is abandoned (its answer
  ignored, no further attempt). Into a *silent* region the hedge goes at once. A try
  slowed by throttling is not hedged into a region that is throttling too. Each hedge
  costs one KMS call (a hedged GenerateDataKey makes a data key that is thrown away);
  ``Telemetry.hedge`` and ``Telemetry.hedge_won`` count them by (from, to).
* **Failovers** are counted by (from, to) through ``Telemetry.failover``: each time an
  operation moves on from a region that failed, or was skipped as open, to the next.

Throttling (RATE_LIMITED after ``max_attempts`` in that region) fails over to the next
region but does not count against the breaker: a throttled region is alive. When every
region an operation tried was throttled, the keyring waits (full-jitter backoff,
:data:`kmsguard.backoff.THROTTLE`) and goes round the throttled regions again, until the
operation's deadline: throttling is waited out, as with one region, but never in one
region while another could serve. (The AWS client factory's own wait-out is turned off
inside this keyring's operations, :data:`kmsguard.backoff.wait_out_throttling`, so a
throttled region hands back after ``max_attempts``.) Errors that another region would
repeat (a disabled key, access denied, bad input) end an encrypt at once; on decrypt the
other regions' entries are still tried.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar

from kmsguard import backoff, operation
from kmsguard.aws.workers import DaemonWorkers
from kmsguard.config_table import ConfigTable
from kmsguard.datakey import DataKey, WrappedKey
from kmsguard.errors import (
    AllRegionsFailed,
    ConfigurationError,
    InvalidCiphertext,
    KeyUnavailable,
    KmsGuardError,
    KmsServiceError,
    KmsTimeout,
    RateLimited,
)
from kmsguard.keyrings.base import KeyRequest, Keyring
from kmsguard.keyrings.region_health import HedgePolicy, RegionHealth
from kmsguard.region_try import Abandoned, RegionTry
from kmsguard.region_try import current as current_try
from kmsguard.telemetry import NULL_TELEMETRY, Telemetry

T = TypeVar("T")
BreakerState = Literal["closed", "open", "half-open"]

#: Failures that say "this region is unwell" (transport, timeouts, 5xx, KMS unavailable).
UNAVAILABLE = (KmsServiceError, KmsTimeout, KeyUnavailable)

#: The least budget a try gets while other regions wait: ten times a slow KMS answer.
ATTEMPT_FLOOR = 0.5

#: How long past the deadline the keyring waits to collect tries ending by their own budgets.
_GRACE = 0.1


class _Try(Generic[T]):
    """One try running in one region: its future, its shared flags, when it began, what it hedged."""

    __slots__ = ("flags", "future", "hedged_from", "region", "started")

    def __init__(
        self, region: str, future: Future[T], flags: RegionTry, started: float, hedged_from: str | None
    ) -> None:
        self.region = region
        self.future = future
        self.flags = flags
        self.started = started
        self.hedged_from = hedged_from


def _abandon(running: Mapping[Future[T], _Try[T]]) -> None:
    for other in running.values():
        other.flags.abandon()


def _budget(until: float | None, untried: int) -> float | None:
    """The deadline of a try with ``untried`` regions (this one included) not yet tried: see ``_launch``."""
    if until is None or untried <= 1:
        return until
    now = time.monotonic()
    remaining = until - now
    return now + min(remaining, max(ATTEMPT_FLOOR, remaining / untried))


class CircuitBreaker:
    """closed -> (``failures`` in a row) -> open -> (``cooldown``) -> half-open -> one probe decides.

    ``allow()`` says whether a request may go to the region now; in half-open it says
    yes to exactly one caller (the probe) until that caller reports ``success()`` or
    ``failure()``. Thread-safe.
    """

    def __init__(self, failures: int = 3, cooldown: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        if failures < 1 or cooldown <= 0:
            raise ValueError("failures must be at least 1 and cooldown positive")
        self.failures = failures
        self.cooldown = cooldown
        self._clock = clock
        self._lock = threading.Lock()
        self._state: BreakerState = "closed"
        self._consecutive = 0
        self._opened_at = 0.0
        self._probing = False

    @property
    def state(self) -> BreakerState:
        with self._lock:
            if self._state == "open" and self._clock() >= self._opened_at + self.cooldown:
                return "half-open"
            return self._state

    def allow(self) -> bool:
        with self._lock:
            if self._state == "closed":
                return True
            if self._state == "open":
                if self._clock() < self._opened_at + self.cooldown:
                    return False
                self._state = "half-open"
            if self._probing:
                return False
            self._probing = True
            return True

    def success(self) -> None:
        with self._lock:
            self._state = "closed"
            self._consecutive = 0
            self._probing = False

    def failure(self) -> None:
        with self._lock:
            self._consecutive += 1
            if self._state == "half-open" or self._consecutive >= self.failures:
                self._state = "open"
                self._opened_at = self._clock()
            self._probing = False

    def release(self) -> None:
        """An allowed request ended without telling anything (abandoned before it was sent): free the probe."""
        with self._lock:
            self._probing = False


class MultiRegionKeyring:
    """Keyrings for several regions behind one :class:`Keyring`, with failover. Thread-safe.

    ``regions`` maps region name to that region's keyring, most preferred first.
    ``region_keys`` maps classification -> region -> key id (single-region keys);
    without an entry the policy's key id is used in every region (an alias that exists
    in each region, or a multi-region key). ``class_regions`` limits a classification to
    some regions (data residency), in the keyring's order. ``hedge`` turns hedging on
    (None, the default here, leaves it off; the stack passes ``[aws]``'s policy, on
    unless ``hedge = false``). ``max_in_flight`` bounds the tries running in one region
    at once (and its worker threads): a region with that many unanswered is skipped.
    """

    def __init__(
        self,
        regions: Mapping[str, Keyring],
        *,
        region_keys: Mapping[str, Mapping[str, str]] | None = None,
        class_regions: Mapping[str, Sequence[str]] | None = None,
        wrap_in_all_regions: bool = False,
        failures: int = 3,
        cooldown: float = 30.0,
        operation_timeout: float = 30.0,
        hedge: HedgePolicy | None = None,
        max_in_flight: int = 32,
        telemetry: Telemetry = NULL_TELEMETRY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not regions:
            raise ConfigurationError("aws.regions: a multi-region keyring needs at least one region")
        self.regions = dict(regions)
        self.region_keys = {c: dict(m) for c, m in (region_keys or {}).items()}
        self.class_regions = {c: tuple(r) for c, r in (class_regions or {}).items()}
        for where, names in [*self.class_regions.items(), *((f"keys.{c}", m) for c, m in self.region_keys.items())]:
            unknown = [r for r in names if r not in self.regions]
            if unknown:
                raise ConfigurationError(f"{where}: region {unknown[0]!r} is not one of aws.regions")
        self.wrap_in_all_regions = wrap_in_all_regions
        self.operation_timeout = operation_timeout
        self.breakers = {r: CircuitBreaker(failures, cooldown, clock) for r in self.regions}
        #: None: no hedging (a region is left only when its try fails or runs out of its budget).
        self.hedge = hedge
        self.health = {r: RegionHealth(hedge or HedgePolicy()) for r in self.regions}
        self.max_in_flight = max(1, max_in_flight)
        self._telemetry = telemetry
        telemetry.breakers(lambda: {region: breaker.state for region, breaker in self.breakers.items()})
        self._workers = {r: DaemonWorkers(self.max_in_flight, name=f"kmsguard-mr-{r}") for r in self.regions}

    # ------------------------------------------------------------------ Keyring protocol

    def generate(self, request: KeyRequest) -> DataKey:
        with self._deadline():
            region, data_key = self._first(request, lambda keyring, req: keyring.generate(req))
            if self.wrap_in_all_regions:
                data_key = self._wrap_in_others(data_key, request, served=region)
            return data_key

    def wrap(self, data_key: DataKey, request: KeyRequest) -> DataKey:
        with self._deadline():
            region, wrapped = self._first(request, lambda keyring, req: keyring.wrap(data_key, req))
            if self.wrap_in_all_regions:
                wrapped = self._wrap_in_others(wrapped, request, served=region)
            return wrapped

    def unwrap(self, wrapped: Sequence[WrappedKey], request: KeyRequest) -> DataKey:
        with self._deadline():
            return self._first(request, lambda keyring, req: keyring.unwrap(wrapped, req), reading=tuple(wrapped))[1]

    def rewrap(self, wrapped: Sequence[WrappedKey], request: KeyRequest) -> tuple[WrappedKey, ...]:
        with self._deadline():
            region, entries = self._first(
                request, lambda keyring, req: keyring.rewrap(wrapped, req), reading=tuple(wrapped)
            )
            if not self.wrap_in_all_regions:
                return entries
            # The other regions' copies: wrap the same data key there (unwrapped in the region that served).
            data_key = self.regions[region].unwrap(entries, self._request_in(region, request))
            return self._wrap_in_others(data_key.with_wrapped(entries), request, served=region).wrapped

    def close(self) -> None:
        for workers in self._workers.values():
            workers.close()
        closed: set[int] = set()
        for keyring in self.regions.values():
            closer = getattr(keyring, "close", None)
            if callable(closer) and id(keyring) not in closed:
                closed.add(id(keyring))
                closer()

    # ------------------------------------------------------------------ internals

    @contextlib.contextmanager
    def _deadline(self) -> Iterator[float | None]:
        """Publish this operation's deadline (the earlier of ours and any outer one)."""
        outer = operation.deadline.get()
        until = time.monotonic() + self.operation_timeout if self.operation_timeout > 0 else None
        if outer is not None and (until is None or outer < until):
            until = outer
        token = operation.deadline.set(until)
        patience = backoff.wait_out_throttling.set(False)  # this keyring goes round the regions instead
        try:
            yield until
        finally:
            backoff.wait_out_throttling.reset(patience)
            operation.deadline.reset(token)

    def _candidates(self, request: KeyRequest) -> list[str]:
        allowed = self.class_regions.get(request.classification)
        regions = [r for r in self.regions if allowed is None or r in allowed]
        return [r for r in regions if _usable_in(self._key_in(r, request), r)]

    def _key_in(self, region: str, request: KeyRequest) -> str:
        return self.region_keys.get(request.classification, {}).get(region, request.key_id)

    def _request_in(self, region: str, request: KeyRequest) -> KeyRequest:
        key_id = self._key_in(region, request)
        return request if key_id == request.key_id else KeyRequest(request.classification, key_id, request.context)

    def _first(
        self,
        request: KeyRequest,
        call: Callable[[Keyring, KeyRequest], T],
        reading: tuple[WrappedKey, ...] | None = None,
    ) -> tuple[str, T]:
        """Run ``call`` in the first region that is healthy and able to; fail over on regional failure.

        ``reading`` (the entries, for unwrap and rewrap) skips regions that hold no entry
        they could open, and tries the next region after any error, not only outages.
        When no region served and some were throttled, those are tried again after a
        backoff, round after round, until the deadline (without one: a single round).
        """
        errors: dict[str, KmsGuardError | str] = {}
        regions = [r for r in self._candidates(request) if reading is None or _can_open(self.regions[r], reading)]
        rounds = 0
        left: str | None = None  # the last region this operation moved on from
        while True:
            throttled: list[str] = []
            served, left = self._race(regions, request, call, reading is not None, errors, throttled, left, rounds)
            if served is not None:
                return served
            rounds += 1
            until = operation.deadline.get()
            if not throttled or until is None or not backoff.THROTTLE.wait(rounds, until):
                raise _failure(request, list(errors.items()), reading is not None)
            regions = throttled

    def _race(
        self,
        regions: Sequence[str],
        request: KeyRequest,
        call: Callable[[Keyring, KeyRequest], T],
        reading: bool,
        errors: dict[str, KmsGuardError | str],
        throttled: list[str],
        left: str | None,
        rounds: int,
    ) -> tuple[tuple[str, T] | None, str | None]:
        """One round over ``regions`` in order: fail over on failure, hedge on silence; the first success wins.

        A region is tried when the previous one failed (a failover) or, with hedging on,
        when the tries running have not answered within the newest one's hedge delay (a
        hedge; at once when that region is silent). A hedge is held back when the try
        is slow because it is being throttled and the next region is throttling too.
        When one try succeeds the others are abandoned: their answers are ignored and
        they make no further attempt. Returns the region and result (None when every
        region failed: ``errors`` and ``throttled`` say how) and the region last moved on
        from (``left``, carried across rounds for the failover counts).
        """
        until = operation.deadline.get()
        waiting = list(regions)
        running: dict[Future[T], _Try[T]] = {}
        hold = False  # a hedge was held back for throttling: wait for an answer before deciding again
        while True:
            if not running:
                if until is not None and time.monotonic() >= until:
                    if not rounds:
                        tried = _summary(list(errors.items())) or "nothing"
                        raise KmsTimeout(f"the operation deadline passed; tried: {tried}")
                    return None, left
                first_choice = waiting[0] if waiting else None
                launched = self._launch(waiting, request, call, until, errors)
                if launched is None:
                    return None, left
                if left is None and first_choice != launched.region:
                    left = first_choice  # skipped: its breaker is open, or it is busy
                if left is not None and left != launched.region:
                    self._telemetry.failover(left, launched.region)
                running[launched.future] = launched
            newest = max(running.values(), key=lambda t: t.started)
            now = time.monotonic()
            expired = until is not None and now >= until
            timeout = None if until is None else max(0.0, until - now)
            can_hedge = self.hedge is not None and bool(waiting) and not hold and not expired
            if can_hedge:
                health = self.health[newest.region]
                due = 0.0 if health.silent() else newest.started + health.hedge_delay() - now
                timeout = max(0.0, due) if timeout is None else min(timeout, max(0.0, due))
            elif timeout is not None:
                timeout += _GRACE  # every try ends by its own budget, within the deadline
            done, _ = wait(running, timeout=timeout, return_when=FIRST_COMPLETED)
            for future in done:
                ended = running.pop(future)
                exc = future.exception()
                if exc is None:
                    _abandon(running)
                    if ended.hedged_from is not None:
                        self._telemetry.hedge_won(ended.hedged_from, ended.region)
                    return (ended.region, future.result()), left
                if not isinstance(exc, KmsGuardError) or not (reading or isinstance(exc, (*UNAVAILABLE, RateLimited))):
                    _abandon(running)
                    raise exc
                errors[ended.region] = exc
                hold = False
                if isinstance(exc, UNAVAILABLE):
                    left = ended.region
                elif isinstance(exc, RateLimited):
                    throttled.append(ended.region)
                    left = ended.region
            if done or not running:
                continue
            if not can_hedge:  # the deadline passed (with its grace) and tries are still out
                _abandon(running)
                tried = _summary([*errors.items(), *((t.region, "no answer") for t in running.values())])
                raise KmsTimeout(f"the operation deadline passed; tried: {tried}")
            if until is not None and time.monotonic() >= until:
                continue  # the deadline, not the hedge delay, ended the wait
            if newest.flags.throttled and self.health[waiting[0]].throttling():
                hold = True
                continue
            hedge = self._launch(waiting, request, call, until, errors, hedged_from=newest.region)
            if hedge is not None:
                self._telemetry.hedge(newest.region, hedge.region)
                running[hedge.future] = hedge

    def _launch(
        self,
        waiting: list[str],
        request: KeyRequest,
        call: Callable[[Keyring, KeyRequest], T],
        until: float | None,
        errors: dict[str, KmsGuardError | str],
        *,
        hedged_from: str | None = None,
        last: bool | None = None,
    ) -> _Try[T] | None:
        """Start a try in the first of ``waiting`` that may take one (popping the ones skipped); None if none may.

        The try's budget (its own deadline) is a share of the time left: with ``n``
        regions not yet tried (this one included; regions whose breaker is open do not
        count), ``1/n`` of it (at least ``ATTEMPT_FLOOR``), so that one region's silence
        leaves time for the others; the last region gets all of it. ``last`` (default:
        no region left to try after this one) lets the AWS layer retry a timed-out HTTP
        attempt until that budget ends instead of handing it back.
        """
        while waiting:
            region = waiting.pop(0)
            health = self.health[region]
            if health.in_flight >= self.max_in_flight:
                errors[region] = "busy"
                continue
            if health.in_flight and health.silent():
                errors[region] = "silent"  # one try at a time learns whether it answers again
                continue
            if not self.breakers[region].allow():
                errors[region] = "circuit open"
                continue
            viable = [r for r in waiting if self.breakers[r].state != "open"]  # the others left to try
            flags = RegionTry(last=not viable if last is None else last, on_throttle=health.throttled)
            budget = _budget(until, len(viable) + 1)
            started = health.started()
            context = contextvars.copy_context()
            req = self._request_in(region, request)
            future = self._workers[region].submit(
                functools.partial(context.run, self._try, region, flags, started, budget, call, req)
            )
            return _Try(region, future, flags, started, hedged_from)
        return None

    def _try(
        self,
        region: str,
        flags: RegionTry,
        started: float,
        until: float | None,
        call: Callable[[Keyring, KeyRequest], T],
        request: KeyRequest,
    ) -> T:
        """One region's try, on a worker thread: report its outcome to the region's breaker and health."""
        operation.deadline.set(until)
        current_try.set(flags)
        breaker, health = self.breakers[region], self.health[region]
        try:
            result = call(self.regions[region], request)
        except Abandoned:
            breaker.release()
            health.ended(started, answered=flags.answered)
            raise
        except KmsTimeout:
            breaker.failure()  # silence is a failure, as a refused connection is
            health.ended(started, answered=flags.answered)
            raise
        except UNAVAILABLE:
            breaker.failure()
            health.ended(started, answered=True)
            raise
        except RateLimited:
            breaker.success()  # it answered: alive, only busy
            health.ended(started, answered=True)
            raise
        except KmsGuardError:
            breaker.success()
            health.ended(started, answered=True)
            raise
        except BaseException:
            breaker.failure()
            health.ended(started, answered=flags.answered)
            raise
        breaker.success()
        health.ended(started, answered=True, ok=True)
        return result

    def _wrap_in_others(self, data_key: DataKey, request: KeyRequest, served: str) -> DataKey:
        """Add a wrapped copy from every other usable region, in parallel, within each copy's budget.

        A region whose breaker is open, that is down or throttled, or that does not answer
        within its budget is left out: the envelope then opens in fewer regions, which
        beats failing the encrypt during an outage. A *silent* region (see
        :mod:`kmsguard.keyrings.region_health`) is still asked, so that its breaker
        learns, but not waited for. Any other error (a missing or disabled key, denied
        access) is a configuration fault that would silently cost a region's copy of
        every envelope, so it fails the encrypt.
        """
        others = [r for r in self._candidates(request) if r != served]
        until = operation.deadline.get()
        awaited: list[Future[DataKey]] = []
        errors: dict[str, KmsGuardError | str] = {}  # the skipped regions: nothing to report
        wrap: Callable[[Keyring, KeyRequest], DataKey] = lambda keyring, req: keyring.wrap(data_key, req)  # noqa: E731
        for region in others:
            silent = self.health[region].silent()
            copy = self._launch([region], request, wrap, until, errors, last=False)
            if copy is not None and not silent:
                awaited.append(copy.future)
        if not awaited:
            return data_key
        done, _pending = wait(awaited, timeout=None if until is None else max(0.0, until - time.monotonic()) + _GRACE)
        added: list[WrappedKey] = []
        for future in done:
            exc = future.exception()
            if exc is None:
                added.extend(future.result().wrapped[len(data_key.wrapped) :])
            elif not isinstance(exc, (*UNAVAILABLE, RateLimited)):
                raise exc
        return data_key.with_wrapped((*data_key.wrapped, *added)) if added else data_key


@dataclass(frozen=True)
class MultiRegionOptions:
    """The ``[aws]`` settings this keyring adds (validated here, the component that owns them)::

        [aws]
        regions = ["eu-west-1", "eu-central-1"]   # order of preference
        wrap_in_all_regions = true                 # single-region keys: wrap each new data key everywhere
        breaker_failures = 3                       # consecutive outages that open a region's breaker
        breaker_cooldown = 30                      # seconds a region is skipped before one probe
        hedge = true                               # repeat a call in the next region when one is slow to answer
        hedge_delay_min = 0.1                      # the hedge delay's floor and cap, in seconds
        hedge_delay_max = 1.0                      # (between them: the region's recent p95 latency)
        [aws.keys.payment]                         # single-region keys: a key id per region
        eu-west-1 = "arn:aws:kms:eu-west-1:111122223333:key/..."
        eu-central-1 = "arn:aws:kms:eu-central-1:111122223333:key/..."
    """

    wrap_in_all_regions: bool = False
    breaker_failures: int = 3
    breaker_cooldown: float = 30.0
    region_keys: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    hedge: HedgePolicy | None = field(default_factory=HedgePolicy)

    @classmethod
    def from_section(cls, section: Mapping[str, Any]) -> MultiRegionOptions:
        from kmsguard.aws.settings import KNOWN_FIELDS

        aws = ConfigTable(section, "aws", KNOWN_FIELDS)
        keys = aws.table("keys", None)
        region_keys: dict[str, dict[str, str]] = {}
        for name in keys.names():
            table = keys.table(name, None)
            region_keys[name] = {region: table.string(region) for region in table.names()}
        hedge = HedgePolicy(
            aws.number("hedge_delay_min", 0.1, above=0), aws.number("hedge_delay_max", 1.0, above=0)
        )
        return cls(
            wrap_in_all_regions=aws.boolean("wrap_in_all_regions", False),
            breaker_failures=aws.integer("breaker_failures", 3, minimum=1),
            breaker_cooldown=aws.number("breaker_cooldown", 30.0, above=0),
            region_keys=region_keys,
            hedge=hedge if aws.boolean("hedge", True) else None,
        )


def _usable_in(key_id: str, region: str) -> bool:
    """False for a single-region key ARN of another region (that region's client cannot use it)."""
    from kmsguard.aws.arn import KeyArn

    arn = KeyArn.parse(key_id)
    return arn is None or arn.multi_region or arn.region == region


def _can_open(keyring: Keyring, wrapped: tuple[WrappedKey, ...]) -> bool:
    """Whether ``keyring`` holds a key for one of the entries (keyrings that cannot tell: yes)."""
    local_arn: Callable[[WrappedKey], str | None] | None = getattr(keyring, "local_arn", None)
    return local_arn is None or any(local_arn(w) is not None for w in wrapped)


def _summary(errors: Sequence[tuple[str, KmsGuardError | str]]) -> str:
    return "; ".join(f"{region}: {e if isinstance(e, str) else e.code}" for region, e in errors)


def _failure(request: KeyRequest, errors: list[tuple[str, Any]], reading: bool) -> KmsGuardError:
    """The one error an operation raises when no region served it."""
    if not errors:
        if reading:
            return InvalidCiphertext()
        return ConfigurationError(
            f"classification {request.classification!r}: no configured region can use key {request.key_id}"
        )
    specific = [e for _, e in errors if isinstance(e, KmsGuardError) and not isinstance(e, (*UNAVAILABLE, RateLimited))]
    if reading and specific:
        meaningful = [e for e in specific if not isinstance(e, InvalidCiphertext)]
        if meaningful or len(specific) == len(errors):
            return (meaningful or specific)[0]
    return AllRegionsFailed(f"every region failed for {request.classification!r}: {_summary(errors)}")

