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
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from kmsguard import backoff, operation
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
from kmsguard.telemetry import NULL_TELEMETRY, Telemetry

T = TypeVar("T")
BreakerState = Literal["closed", "open", "half-open"]

#: Failures that say "this region is unwell" (transport, timeouts, 5xx, KMS unavailable).
UNAVAILABLE = (KmsServiceError, KmsTimeout, KeyUnavailable)


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


class MultiRegionKeyring:
    """Keyrings for several regions behind one :class:`Keyring`, with failover. Thread-safe.

    ``regions`` maps region name to that region's keyring, most preferred first.
    ``region_keys`` maps classification -> region -> key id (single-region keys);
    without an entry the policy's key id is used in every region (an alias that exists
    in each region, or a multi-region key). ``class_regions`` limits a classification to
    some regions (data residency), in the keyring's order.
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
        self._telemetry = telemetry
        self._pool = ThreadPoolExecutor(max_workers=max(4, 2 * len(self.regions)), thread_name_prefix="kmsguard-mr")

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
            return self._first(
                request, lambda keyring, req: keyring.unwrap(wrapped, req), reading=tuple(wrapped)
            )[1]

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
        self._pool.shutdown(wait=False, cancel_futures=True)
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
        left: str | None = None  # the last region this operation moved on from
        regions = self._candidates(request)
        rounds = 0
        while True:
            throttled: list[str] = []
            for region in regions:
                keyring = self.regions[region]
                if reading is not None and not _can_open(keyring, reading):
                    continue
                until = operation.deadline.get()
                if until is not None and time.monotonic() >= until:
                    if rounds:
                        raise _failure(request, list(errors.items()), reading is not None)
                    tried = _summary(list(errors.items())) or "nothing"
                    raise KmsTimeout(f"the operation deadline passed; tried: {tried}")
                breaker = self.breakers[region]
                if not breaker.allow():
                    errors[region] = "circuit open"
                    left = left or region
                    continue
                if left is not None and left != region:
                    self._telemetry.failover(left, region)
                try:
                    result = call(keyring, self._request_in(region, request))
                except UNAVAILABLE as exc:
                    breaker.failure()
                    errors[region] = exc
                    left = region
                    continue
                except RateLimited as exc:
                    breaker.success()  # it answered: alive, only busy
                    errors[region] = exc
                    throttled.append(region)
                    left = region
                    continue
                except KmsGuardError as exc:
                    breaker.success()
                    if reading is None:
                        raise
                    errors[region] = exc
                    continue
                breaker.success()
                return region, result
            rounds += 1
            until = operation.deadline.get()
            if not throttled or until is None or not backoff.THROTTLE.wait(rounds, until):
                raise _failure(request, list(errors.items()), reading is not None)
            regions = throttled

    def _wrap_in_others(self, data_key: DataKey, request: KeyRequest, served: str) -> DataKey:
        """Add a wrapped copy from every other usable region, in parallel, within the deadline.

        A region whose breaker is open, that is down or throttled, or that does not answer
        before the deadline is left out: the envelope then opens in fewer regions, which
        beats failing the encrypt during an outage. Any other error (a missing or disabled
        key, denied access) is a configuration fault that would silently cost a region's
        copy of every envelope, so it fails the encrypt.
        """
        others = [r for r in self._candidates(request) if r != served and self.breakers[r].allow()]
        if not others:
            return data_key
        futures: dict[Future[DataKey], str] = {}
        for region in others:
            ctx = contextvars.copy_context()  # the operation and its deadline follow the call
            req = self._request_in(region, request)
            futures[self._pool.submit(ctx.run, self.regions[region].wrap, data_key, req)] = region
        until = operation.deadline.get()
        done, _pending = wait(futures, timeout=None if until is None else max(0.0, until - time.monotonic()))
        added: list[WrappedKey] = []
        fault: BaseException | None = None
        for future, region in futures.items():
            breaker = self.breakers[region]
            if future not in done:
                breaker.failure()
                continue
            exc = future.exception()
            if exc is None:
                breaker.success()
                added.extend(future.result().wrapped[len(data_key.wrapped) :])
            elif isinstance(exc, UNAVAILABLE):
                breaker.failure()
            else:
                breaker.success()
                if not isinstance(exc, RateLimited):
                    fault = fault or exc
        if fault is not None:
            raise fault
        return data_key.with_wrapped((*data_key.wrapped, *added)) if added else data_key


@dataclass(frozen=True)
class MultiRegionOptions:
    """The ``[aws]`` settings this keyring adds (validated here, the component that owns them)::

        [aws]
        regions = ["eu-west-1", "eu-central-1"]   # order of preference
        wrap_in_all_regions = true                 # single-region keys: wrap each new data key everywhere
        breaker_failures = 3                       # consecutive outages that open a region's breaker
        breaker_cooldown = 30                      # seconds a region is skipped before one probe
        [aws.keys.payment]                         # single-region keys: a key id per region
        eu-west-1 = "arn:aws:kms:eu-west-1:111122223333:key/..."
        eu-central-1 = "arn:aws:kms:eu-central-1:111122223333:key/..."
    """

    wrap_in_all_regions: bool = False
    breaker_failures: int = 3
    breaker_cooldown: float = 30.0
    region_keys: Mapping[str, Mapping[str, str]] = field(default_factory=dict)

    @classmethod
    def from_section(cls, section: Mapping[str, Any]) -> MultiRegionOptions:
        from kmsguard.aws.settings import KNOWN_FIELDS

        aws = ConfigTable(section, "aws", KNOWN_FIELDS)
        keys = aws.table("keys", None)
        region_keys: dict[str, dict[str, str]] = {}
        for name in keys.names():
            table = keys.table(name, None)
            region_keys[name] = {region: table.string(region) for region in table.names()}
        return cls(
            wrap_in_all_regions=aws.boolean("wrap_in_all_regions", False),
            breaker_failures=aws.integer("breaker_failures", 3, minimum=1),
            breaker_cooldown=aws.number("breaker_cooldown", 30.0, above=0),
            region_keys=region_keys,
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

