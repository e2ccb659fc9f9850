"""The state one self-test run shares between its checks: settings, options, the Guard under test, the report.

A run builds its own Guard from the settings (its own data-key cache and its own audit
writer, so its chain is short and complete, and a service's serving cache is left
alone), plus a *cold* Guard over the same backend without the cache, whose every
operation is a real key-service call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kmsguard.config import Settings
from kmsguard.errors import KmsGuardError
from kmsguard.guard import Guard
from kmsguard.keyrings.base import backend_of
from kmsguard.policy import SELFTEST_CONTEXT_KEY, ClassPolicy
from kmsguard.selftest.report import Report, Result, Status, Timer
from kmsguard.selftest.settings import SelftestSettings

if TYPE_CHECKING:
    from kmsguard.aws import AwsSettings, ClientFactory

#: The context every self-test operation carries: its audit record (and CloudTrail entry) says so,
#: and dashboards can leave these operations out.
SELFTEST_CONTEXT = {SELFTEST_CONTEXT_KEY: "1"}


def describe(exc: BaseException) -> str:
    """An error for a detail line: a kmsguard error's code and message (they never carry data),
    anything else by its type only (a driver's message may hold a DSN or a host's secret)."""
    if isinstance(exc, KmsGuardError):
        return f"{exc.code}: {exc.message}"
    return f"unexpected {type(exc).__name__}"


@dataclass
class Run:
    """One self-test run. ``classes`` are the classifications under test (all by default)."""

    settings: Settings
    options: SelftestSettings
    report: Report
    classes: list[ClassPolicy]
    strict: bool = False
    #: A serving Guard (the service's) whose audit spool the audit check also looks at.
    serving: Guard | None = None
    #: Set by the checks as they learn: which classifications round-tripped.
    roundtrip_ok: set[str] = field(default_factory=set)
    _guard: Guard | None = None
    _guard_error: BaseException | None = None
    _cold: Guard | None = None
    _factory: ClientFactory | None = None
    _aws: AwsSettings | None = None

    @property
    def aws(self) -> bool:
        return self.settings.backend == "aws"

    @property
    def production(self) -> bool:
        return self.settings.environment == "production"

    def add(
        self,
        check: str,
        title: str,
        status: Status,
        detail: str,
        *,
        critical: bool,
        subject: str | None = None,
        timer: Timer | None = None,
        ms: float | None = None,
    ) -> Result:
        """Record one result; its duration is ``ms``, else ``timer``'s time so far."""
        if ms is None:
            ms = timer.stop() if timer is not None else 0.0
        return self.report.add(Result(check, title, critical, status, detail, subject, ms))

    # ------------------------------------------------------------------ what the checks share

    def guard(self) -> Guard:
        """The Guard under test (built on first use); its build error is re-raised to every caller."""
        if self._guard is None:
            if self._guard_error is not None:
                raise self._guard_error
            try:
                self._guard = Guard.from_settings(self.settings)
            except Exception as exc:
                self._guard_error = exc
                raise
        return self._guard

    def cold_guard(self) -> Guard:
        """A Guard over the same backend and observers without the data-key cache: every
        operation calls the key service (it is never closed on its own: it owns nothing)."""
        if self._cold is None:
            guard = self.guard()
            self._cold = Guard(
                guard.policy,
                backend_of(guard.keyring),
                observers=guard.observers,
                principal=guard.principal,
                settings=self.settings,
            )
        return self._cold

    def aws_settings(self) -> AwsSettings:
        if self._aws is None:
            from kmsguard.aws import AwsSettings

            s = self.settings
            self._aws = AwsSettings.from_section(s.section("aws"), s.env, s.environment)
        return self._aws

    def factory(self) -> ClientFactory:
        """One client factory for the management calls of this run (keys, connectivity)."""
        if self._factory is None:
            from kmsguard.aws import ClientFactory

            self._factory = ClientFactory(self.aws_settings())
        return self._factory

    def close(self, audit_timeout: float) -> None:
        """Close the Guard under test; its audit writer gets ``audit_timeout`` to deliver what is left.

        The writer may be shared with other Guards of the process (the service's own, under
        ``/v1/selftest``): it is flushed, and ``guard.close()`` gives up this Guard's use of it.
        """
        from kmsguard.audit.writer import AuditObserver

        factory, self._factory = self._factory, None
        if factory is not None:
            factory.close()
        guard, self._guard = self._guard, None
        if guard is None:
            return
        for observer in guard.observers:
            if isinstance(observer, AuditObserver):
                observer.flush(audit_timeout, until_failing=True)
        guard.close()


