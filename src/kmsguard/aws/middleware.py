"""botocore event hooks: time every KMS call, count attempts, retries and throttles, enforce the deadline.

botocore emits, per API call, ``before-call`` once, ``response-received`` after every
attempt (retries included) and ``after-call`` or ``after-call-error`` once at the end.
:class:`KmsMiddleware` hangs off those events on each client it is attached to:

* the call's wall time (retries and back-off included), attempts and throttled attempts
  go into :class:`KmsStats` (thread-safe totals by API, region and outcome) and to
  ``Telemetry.kms_call``;
* ``before-send`` refuses to start another attempt once the operation's deadline (set
  by the caller in :data:`deadline`) has passed, so a call abandoned by its caller
  stops retrying in the background.

kmsguard retries a call itself (:mod:`kmsguard.aws.retry`), so one logical call is
several botocore calls of one attempt each. :class:`~kmsguard.aws.clients.ClientFactory`
therefore opens a :class:`CallState` for the logical call in :data:`current_call`; the
hooks add every attempt and throttle to it and leave the recording to the factory,
which reports the call once, with its final outcome and all its attempts and back-off.
A botocore call made outside the factory (no open state) is recorded here as before.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from kmsguard.aws.errors import DeadlineExceeded, outcome_of
from kmsguard.telemetry import NULL_TELEMETRY, Telemetry

#: error codes botocore treats as throttling (a subset relevant to KMS).
THROTTLE_CODES = frozenset({"ThrottlingException", "LimitExceededException", "Throttling", "TooManyRequestsException"})

#: The monotonic time after which no new attempt may start; set around each call.
deadline: ContextVar[float | None] = ContextVar("kmsguard_kms_deadline", default=None)


class CallState:
    """One logical KMS call's running totals, shared by all its attempts (and threads)."""

    __slots__ = ("api", "attempts", "owned", "started", "t0", "throttles")

    def __init__(self, api: str, *, owned: bool) -> None:
        self.api = api
        self.t0 = time.perf_counter()
        self.attempts = 0
        self.throttles = 0
        #: Whether botocore began the call (a client that could not be built made none).
        self.started = False
        #: True when the factory records the call itself (it knows the final outcome).
        self.owned = owned


#: The logical call in progress (set by ClientFactory.call; copied into its worker thread).
current_call: ContextVar[CallState | None] = ContextVar("kmsguard_kms_call", default=None)

_STATE_KEY = "kmsguard"


@dataclass
class CallStats:
    """Totals for one (api, region, outcome)."""

    calls: int = 0
    attempts: int = 0
    retries: int = 0
    throttles: int = 0
    total_seconds: float = 0.0
    max_seconds: float = 0.0


class KmsStats:
    """Thread-safe totals of KMS calls by (api, region, outcome); the metrics exporter reads ``snapshot()``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_key: dict[tuple[str, str, str], CallStats] = {}

    def record(self, api: str, region: str, outcome: str, seconds: float, attempts: int, throttles: int) -> None:
        with self._lock:
            s = self._by_key.setdefault((api, region, outcome), CallStats())
            s.calls += 1
            s.attempts += attempts
            s.retries += max(attempts - 1, 0)
            s.throttles += throttles
            s.total_seconds += seconds
            s.max_seconds = max(s.max_seconds, seconds)

    def snapshot(self) -> dict[tuple[str, str, str], CallStats]:
        """A copy: ``{(api, region, outcome): CallStats}``."""
        with self._lock:
            return {k: CallStats(**vars(v)) for k, v in self._by_key.items()}

    def total(
        self, field: str, *, api: str | None = None, region: str | None = None, outcome: str | None = None
    ) -> int:
        """Sum of one counter (``calls``, ``attempts``, ``retries``, ``throttles``) over the matching rows."""
        return sum(
            int(getattr(s, field))
            for (a, r, o), s in self.snapshot().items()
            if (api is None or a == api) and (region is None or r == region) and (outcome is None or o == outcome)
        )


class KmsMiddleware:
    """The hooks for one client (one region). ``attach(client)`` registers them."""

    def __init__(self, region: str, stats: KmsStats, telemetry: Telemetry = NULL_TELEMETRY) -> None:
        self.region = region
        self.stats = stats
        self.telemetry = telemetry

    def attach(self, client: Any) -> None:
        events = client.meta.events
        events.register("before-call.kms", self._before_call)
        events.register("before-send.kms", self._before_send)
        events.register("response-received.kms", self._response_received)
        events.register("after-call.kms", self._after_call)
        events.register("after-call-error.kms", self._after_call_error)

    def _before_call(self, model: Any, context: dict[str, Any], **_: Any) -> None:
        state = current_call.get()
        if state is None:
            state = CallState(model.name, owned=False)
        state.started = True
        context[_STATE_KEY] = state

    @staticmethod
    def _before_send(**_: Any) -> None:
        limit = deadline.get()
        if limit is not None and time.monotonic() >= limit:
            raise DeadlineExceeded()

    @staticmethod
    def _response_received(context: Mapping[str, Any], parsed_response: Mapping[str, Any] | None, **_: Any) -> None:
        state: CallState | None = context.get(_STATE_KEY)
        if state is None:
            return
        state.attempts += 1
        code = (parsed_response or {}).get("Error", {}).get("Code")
        if code in THROTTLE_CODES:
            state.throttles += 1

    def _after_call(self, http_response: Any, parsed: Mapping[str, Any], context: Mapping[str, Any], **_: Any) -> None:
        if http_response.status_code < 300:
            self._finish(context, "ok")
        else:
            self._finish(context, _code_outcome(parsed))

    def _after_call_error(self, exception: BaseException, context: Mapping[str, Any], **_: Any) -> None:
        self._finish(context, outcome_of(exception))

    def _finish(self, context: Mapping[str, Any], outcome: str) -> None:
        state: CallState | None = context.get(_STATE_KEY)
        if state is None or state.owned:
            return
        record_call(self.stats, self.telemetry, self.region, state, outcome)


def record_call(stats: KmsStats, telemetry: Telemetry, region: str, state: CallState, outcome: str) -> None:
    """Record one finished logical call: its wall time (retries and back-off included), attempts, throttles."""
    seconds = time.perf_counter() - state.t0
    attempts = max(state.attempts, 1)
    stats.record(state.api, region, outcome, seconds, attempts, state.throttles)
    telemetry.kms_call(state.api, region, outcome, seconds, attempts, state.throttles)


def _code_outcome(parsed: Mapping[str, Any]) -> str:
    from botocore.exceptions import ClientError

    return outcome_of(ClientError(dict(parsed), "-"))  # type: ignore[arg-type]
