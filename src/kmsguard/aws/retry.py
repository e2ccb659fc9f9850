"""kmsguard's retry policy for KMS calls: which failures are retried, how often, how long apart.

kmsguard retries, not botocore. Every client is built with botocore's ``standard`` retry
mode and ``total_max_attempts = 1`` (each botocore call is one HTTP attempt), and
:meth:`~kmsguard.aws.clients.ClientFactory.call` retries around it:

* **Throttling** (``ThrottlingException`` and its aliases) is retried with full-jitter
  exponential backoff (:data:`kmsguard.backoff.THROTTLE`) *until the operation's
  deadline* (``operation_timeout``), however many attempts that takes. A throttled
  request is healthy and KMS is asking it to come back later, so the only good reason
  to give up is that the caller's time is up; a fixed attempt count fails a steady 0.3^N
  share of calls at 30% throttling whatever N is. Without a deadline
  (``operation_timeout = 0``) throttles get ``max_attempts`` like any other failure,
  so a call cannot retry forever.
* **Timeouts** (a connect or read timeout: the endpoint did not answer) are retried on a
  new connection until the operation's deadline when there is nowhere else to go (one
  region, or the last region a multi-region operation can try), so a silent region
  fails *at* the deadline with ``KMS_TIMEOUT``. Inside a multi-region operation with
  other regions left, a timed-out attempt is handed back at once: KMS answers in
  milliseconds, a read that has not answered within ``read_timeout`` will not, and the
  next region (or a hedge, :mod:`kmsguard.keyrings.multi_region`) is the better bet.
  Without a deadline they get ``max_attempts`` like other transient failures.
* **Transient failures** (5xx answers, ``LimitExceededException``, connection errors)
  get at most ``max_attempts`` attempts in all, as before,
  with botocore's 50 ms full-jitter base (:data:`kmsguard.backoff.TRANSIENT`). Failing
  these over (to another region) or reporting them promptly beats waiting out an
  outage, and the multi-region keyring's breaker counts them. ``LimitExceededException``
  is here and not with throttling because KMS also uses it for resource quotas (keys,
  aliases, grants) that no amount of waiting frees.
* Nothing else is retried (a disabled key, denied access, bad input, credentials).

Why not botocore's own retries: ``adaptive`` mode adds a client-side rate limiter that
cuts the send rate to 70% on every throttle and, when a fixed share of calls is throttled
at any rate, never recovers (operations then queue until their deadline). ``standard``
mode has no limiter, but it sleeps without knowing kmsguard's deadline (up to 20 s
between throttled attempts) and spends a per-client retry quota (500 units, 5 per
throttled retry, 14 per other retry, refilled by successes: see botocore's
``retries/standard.py`` ``RetryQuotaChecker``). At 30% throttling with 3 attempts that
quota drifts slightly upward, so it would not matter there; under sustained throttling
it drains, and then botocore stops retrying even connection resets for the whole
client until enough calls succeed. With one attempt per botocore call the quota is
never touched, and the one retry loop here knows the deadline.

The multi-region keyring turns the wait-out off for its calls
(:data:`kmsguard.backoff.wait_out_throttling`): a throttled region there gets
``max_attempts`` and then the next region is tried, and the keyring itself goes round
the throttled regions again with the same backoff until the deadline.
"""

from __future__ import annotations

from typing import Literal

from botocore import exceptions as bx

from kmsguard.aws.errors import DeadlineExceeded

Kind = Literal["throttle", "timeout", "transient"]

#: Error codes that mean "too many requests, slow down": waited out until the deadline.
THROTTLING_CODES = frozenset({"ThrottlingException", "Throttling", "TooManyRequestsException"})

#: Other codes botocore's standard mode retries (throttling-like or transient); bounded by max_attempts.
TRANSIENT_CODES = frozenset(
    {
        "LimitExceededException",
        "RequestLimitExceeded",
        "RequestTimeout",
        "RequestTimeoutException",
        "PriorRequestNotComplete",
        "KMSInternalException",
        "KeyUnavailableException",
        "DependencyTimeoutException",
        "ServiceUnavailableException",
    }
)

#: HTTP statuses botocore's standard mode treats as transient.
TRANSIENT_STATUSES = frozenset({429, 500, 502, 503, 504})


def retry_kind(exc: BaseException) -> Kind | None:
    """How a failed KMS attempt may be retried: ``"throttle"``, ``"timeout"``, ``"transient"`` or not at all (None).

    Mirrors botocore's standard-mode retry conditions (``TransientRetryableChecker``,
    ``ThrottledRetryableChecker``), with throttling split out to be waited out.
    """
    if isinstance(exc, DeadlineExceeded):
        return None
    if isinstance(exc, bx.ClientError):
        code = exc.response.get("Error", {}).get("Code")
        if code in THROTTLING_CODES:
            return "throttle"
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in TRANSIENT_CODES or status in TRANSIENT_STATUSES:
            return "transient"
        return None
    if isinstance(exc, bx.ConnectTimeoutError | bx.ReadTimeoutError):
        return "timeout"
    if isinstance(exc, bx.ConnectionError | bx.HTTPClientError):
        return "transient"
    return None
