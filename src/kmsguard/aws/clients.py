"""The client factory: one tuned, shared boto3 KMS client per region, and calls under a deadline.

Clients are expensive (endpoint resolution, a connection pool, credential resolution)
and thread-safe, so the factory builds one per (region, profile, role, endpoint) under
a lock and every thread shares it. Each client gets:

* ``retries={"mode": "standard", "total_max_attempts": 1}`` — one HTTP attempt per
  botocore call, because kmsguard retries itself (:mod:`kmsguard.aws.retry`): throttling
  until the operation's deadline, transient failures up to ``max_attempts``, with
  full-jitter backoff that never sleeps past the deadline. ``standard`` rather than
  ``adaptive``: adaptive mode's client-side rate limiter acts even with one attempt
  and, under a steady share of throttled calls, never lets the send rate recover;
* connect and read timeouts, ``max_pool_connections`` sized for the concurrency (an
  undersized pool makes botocore open and discard connections), TCP keep-alive, and a
  ``kmsguard/<version>`` user agent;
* the :mod:`~kmsguard.aws.middleware` hooks (timing, counts, deadline).

botocore has no overall deadline: a call may take ``attempts x (connect + read)`` plus
back-off. :meth:`ClientFactory.call` therefore runs each attempt on a worker thread and
waits at most until the operation's deadline (inside a multi-region try: the try's
budget, which the keyring publishes as that deadline); past it the caller gets
``KmsTimeout`` at once, and the middleware stops the abandoned call from starting
another attempt. botocore's ``connect_timeout`` and ``read_timeout`` stay the ceiling of
one HTTP attempt, so a worker left behind by an abandoned call is free again within
them; each region has its own bounded set of workers, so calls stuck in a silent
region never hold up another region's.

Credentials come only from boto3's chain (environment, shared files, SSO, container
and instance metadata, web identity), optionally for a named ``profile``; with
``role_arn`` that identity assumes the role (session name ``kmsguard``) through
botocore's refreshing credentials, renewed before they expire.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TYPE_CHECKING, Any, TypeVar

import boto3
import botocore.session
from botocore import xform_name
from botocore.config import Config
from botocore.credentials import (
    AssumeRoleCredentialFetcher,
    CredentialProvider,
    Credentials,
    DeferredRefreshableCredentials,
)
from botocore.exceptions import ClientError

from kmsguard import __version__, backoff, operation
from kmsguard.aws import middleware, redact
from kmsguard.aws.errors import DeadlineExceeded, map_error
from kmsguard.aws.middleware import KmsMiddleware, KmsStats
from kmsguard.aws.retry import Kind, retry_kind
from kmsguard.aws.settings import AwsSettings
from kmsguard.aws.workers import DaemonWorkers
from kmsguard.errors import KmsGuardError, KmsTimeout
from kmsguard.region_try import Abandoned, RegionTry
from kmsguard.region_try import current as current_try
from kmsguard.telemetry import NULL_TELEMETRY, Telemetry

if TYPE_CHECKING:
    from mypy_boto3_kms import KMSClient

T = TypeVar("T")
USER_AGENT = f"kmsguard/{__version__}"


class _AssumedRole(CredentialProvider):
    """Puts refreshing assume-role credentials first in a session's provider chain."""

    METHOD = "kmsguard-assume-role"
    CANONICAL_NAME = "kmsguard-assume-role"

    def __init__(self, credentials: Credentials) -> None:
        super().__init__()
        self._credentials = credentials

    def load(self) -> Credentials:
        return self._credentials


class ClientFactory:
    """Builds and shares KMS clients for one set of :class:`AwsSettings`; runs calls under a deadline.

    ``telemetry`` receives one ``kms_call`` per API call; ``stats`` keeps the same
    totals in-process (``factory.stats.snapshot()``).
    """

    def __init__(
        self, settings: AwsSettings, telemetry: Telemetry = NULL_TELEMETRY, stats: KmsStats | None = None
    ) -> None:
        self.settings = settings
        self.telemetry = telemetry
        self.stats = stats if stats is not None else KmsStats()
        self._lock = threading.Lock()
        self._session: boto3.Session | None = None
        self._clients: dict[tuple[str, str | None, str | None, str | None], KMSClient] = {}
        self._workers: dict[str, DaemonWorkers] = {}
        redact.install()
        _factories.add(self)

    # ------------------------------------------------------------------ clients

    def config(self, region: str) -> Config:
        """The botocore Config every KMS client of this factory uses (one attempt per call: see the module doc)."""
        s = self.settings
        return Config(
            region_name=region,
            retries={"mode": "standard", "total_max_attempts": 1},
            connect_timeout=s.connect_timeout,
            read_timeout=s.read_timeout,
            max_pool_connections=s.max_pool_connections,
            tcp_keepalive=s.tcp_keepalive,
            user_agent_extra=USER_AGENT,
        )

    def client(self, region: str) -> KMSClient:
        """The shared client for ``region`` (created on first use). Raises botocore errors."""
        s = self.settings
        endpoint = s.endpoint_for(region)
        key = (region, s.profile, s.role_arn, endpoint)
        client = self._clients.get(key)
        if client is not None:
            return client
        with self._lock:
            client = self._clients.get(key)
            if client is None:
                client = self._boto_session().client(
                    "kms", region_name=region, endpoint_url=endpoint, config=self.config(region)
                )
                KmsMiddleware(region, self.stats, self.telemetry).attach(client)
                self._clients[key] = client
                redact.install()  # every botocore module is imported by now
        return client

    def session(self) -> boto3.Session:
        """The boto3 session behind every client (profile and role applied)."""
        with self._lock:
            return self._boto_session()

    def _boto_session(self) -> boto3.Session:
        if self._session is None:
            core = self._core_session()
            if self.settings.role_arn:
                # The source identity lives in its own session: the role's provider must not find itself.
                role = _AssumedRole(self._assume(self._core_session()))
                core.get_component("credential_provider").insert_before("env", role)
            self._session = boto3.Session(botocore_session=core)
        return self._session

    def _core_session(self) -> botocore.session.Session:
        core = botocore.session.Session(profile=self.settings.profile)
        if not core.get_config_variable("region"):
            core.set_config_variable("region", self.settings.region)
        return core

    def _assume(self, source: botocore.session.Session) -> Credentials:
        """Refreshing credentials for ``role_arn``, fetched with the source identity on first use."""
        s = self.settings
        assert s.role_arn is not None
        role_arn = s.role_arn
        extra: dict[str, Any] = {"RoleSessionName": s.role_session_name, "DurationSeconds": s.role_duration_seconds}
        if s.external_id:
            extra["ExternalId"] = s.external_id

        def fetch() -> dict[str, Any]:
            source_credentials = source.get_credentials()
            if source_credentials is None:
                from botocore.exceptions import NoCredentialsError

                raise NoCredentialsError()
            fetcher = AssumeRoleCredentialFetcher(
                client_creator=source.create_client,
                source_credentials=source_credentials,
                role_arn=role_arn,
                extra_args=extra,
            )
            result: dict[str, Any] = fetcher.fetch_credentials()
            return result

        return DeferredRefreshableCredentials(refresh_using=fetch, method="assume-role")

    # ------------------------------------------------------------------ calls

    def deadline(self) -> float | None:
        """The monotonic time by which an operation starting now must finish (None: no limit).

        An enclosing operation's deadline (:data:`kmsguard.operation.deadline`, set by
        the multi-region keyring) wins when it is earlier.
        """
        timeout = self.settings.operation_timeout
        own = time.monotonic() + timeout if timeout > 0 else None
        outer = operation.deadline.get()
        if outer is not None and (own is None or outer < own):
            return outer
        return own

    def call(
        self, region: str, api: str, *, until: float | None = None, key_ref: str | None = None, **params: Any
    ) -> dict[str, Any]:
        """Call KMS ``api`` (e.g. ``"GenerateDataKey"``) in ``region``, with retries; kmsguard errors only.

        ``until`` is the operation's deadline (from :meth:`deadline`; one operation may
        make several calls under one deadline). ``key_ref`` only names the key in errors.
        The call is recorded once in :attr:`stats` and the telemetry, with all its
        attempts, throttles and back-off.
        """
        if until is None:
            until = self.deadline()
        state = middleware.CallState(api, owned=True)
        token = middleware.current_call.set(state)
        outcome = "ok"
        try:
            return self._with_retries(region, api, until, params)
        except Abandoned:
            outcome = "abandoned"
            raise
        except KmsTimeout as exc:
            outcome = exc.code
            raise KmsTimeout(f"KMS {api} in {region}: {exc.message}") from None
        except KmsGuardError as exc:
            outcome = exc.code
            raise
        except Exception as exc:
            error = map_error(exc, api, region, key_ref)
            outcome = error.code
            raise error from None
        finally:
            middleware.current_call.reset(token)
            if state.started:
                middleware.record_call(self.stats, self.telemetry, region, state, outcome)

    def _with_retries(self, region: str, api: str, until: float | None, params: dict[str, Any]) -> dict[str, Any]:
        """The retry loop of :mod:`kmsguard.aws.retry`: raises the last attempt's (botocore) error.

        Inside a multi-region try (:data:`kmsguard.region_try.current`) a throttle is
        reported to the try, and an abandoned try starts no further attempt.

        A call throttled until its deadline raises the throttle (RATE_LIMITED), also when
        the deadline passes while a retry is on its way: the cause the caller can act on
        is the throttling, not the moment the time ran out.
        """
        method: Callable[..., dict[str, Any]] = getattr(self.client(region), xform_name(api))
        region_try = current_try.get()
        attempts = 0
        throttled: Exception | None = None  # the last attempt's throttle, if it was one
        while True:
            attempts += 1
            if region_try is not None:
                region_try.check()
            try:
                if until is None:
                    return method(**params)
                return self._bounded(region, until, method, params)
            except KmsTimeout:
                if throttled is not None:
                    raise throttled from None
                raise  # the deadline passed: nothing left to retry in
            except KmsGuardError:
                raise
            except DeadlineExceeded:  # the middleware's check, before a retry was sent
                if throttled is not None:
                    raise throttled from None
                raise
            except Exception as exc:
                kind = retry_kind(exc)
                throttled = exc if kind == "throttle" else None
                if region_try is not None:
                    if kind == "throttle":
                        region_try.note_throttle()
                    elif kind == "transient" or isinstance(exc, ClientError):
                        region_try.note_answer()  # an error answer or a refused connection: not silence
                if not self._retries(kind, attempts, until, region_try):
                    raise
                policy = backoff.THROTTLE if kind == "throttle" else backoff.TRANSIENT
                if not policy.wait(attempts, until):
                    raise

    def _retries(self, kind: Kind | None, attempts: int, until: float | None, region_try: RegionTry | None) -> bool:
        """Whether a failure of ``kind`` after ``attempts`` attempts gets another (see kmsguard.aws.retry).

        Never in an abandoned try: another region answered first.
        """
        if kind is None or (region_try is not None and region_try.abandoned):
            return False
        if until is not None:
            if kind == "throttle" and backoff.wait_out_throttling.get():
                return True
            if kind == "timeout":
                return region_try is None or region_try.last
        return attempts < self.settings.max_attempts

    def _bounded(self, region: str, until: float, method: Callable[..., T], params: dict[str, Any]) -> T:
        remaining = until - time.monotonic()
        if remaining <= 0:
            raise KmsTimeout("the operation deadline passed before the call")

        def run() -> T:
            middleware.deadline.set(until)
            return method(**params)

        context = contextvars.copy_context()
        future = self._pool(region).submit(lambda: context.run(run))
        try:
            return future.result(timeout=remaining)
        except FutureTimeout:
            future.cancel()
            if current_try.get() is not None:
                raise KmsTimeout(f"no answer within this region's budget ({remaining:.2g}s left)") from None
            raise KmsTimeout(
                f"no answer within the operation deadline ({self.settings.operation_timeout:g}s)"
            ) from None

    def _pool(self, region: str) -> DaemonWorkers:
        """The region's workers: one per region, so calls stuck in a silent region cannot starve the others."""
        workers = self._workers.get(region)
        if workers is None:
            with self._lock:
                workers = self._workers.get(region)
                if workers is None:
                    workers = self._workers[region] = DaemonWorkers(
                        self.settings.max_pool_connections, name=f"kmsguard-kms-{region}"
                    )
        return workers

    def _forked(self) -> None:
        """In a forked child: the worker threads are the parent's (they do not exist here), and
        the clients' connections are shared with it; both are made afresh on first use."""
        self._lock = threading.Lock()
        clients, self._clients, self._workers = list(self._clients.values()), {}, {}
        for client in clients:
            with contextlib.suppress(Exception):
                client.close()  # this process's copies of the sockets only

    def close(self) -> None:
        """Stop the worker threads and close every client's connections."""
        with self._lock:
            workers, self._workers = list(self._workers.values()), {}
            clients, self._clients = list(self._clients.values()), {}
        for pool in workers:
            pool.close()
        for client in clients:
            client.close()


#: Every factory of this process, for the fork handler.
_factories: weakref.WeakSet[ClientFactory] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for factory in list(_factories):
        factory._forked()


os.register_at_fork(after_in_child=_after_fork_in_child)
