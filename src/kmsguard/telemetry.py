"""Process-wide counters that keyrings and the AWS layer report to, and metrics export.

Per-operation facts go into the current :class:`~kmsguard.operation.Operation` (for the
audit record). Facts that are not about one operation — a KMS retry, a cache eviction,
a failover between regions, the audit queue depth — go to a :class:`Telemetry`, which
``stack`` builds once and hands to every component. The default does nothing, so a
component never checks whether anyone listens.

Labels are names only (API, region, classification, outcome); never context values,
key material or data.

Every fact reaches every exporter through here (the Prometheus registry and the
OpenTelemetry bridge, one :class:`Telemetries`), so both carry the same metrics;
tests/test_otel.py holds them to the same names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kmsguard.aws.admin import KeyStatus


class Telemetry:
    """No-op base; the metrics registry overrides what it exports."""

    def kms_call(
        self, api: str, region: str, outcome: str, duration: float, attempts: int = 1, throttles: int = 0
    ) -> None:
        """One KMS API call finished (``duration`` includes botocore's retries)."""

    def cache_event(self, event: str, classification: str) -> None:
        """``miss`` or ``evict`` in a data-key cache."""

    def cache_hits(self, source: Callable[[], Mapping[str, int]]) -> None:
        """A data-key cache counts its hits itself (lifetime hits per classification, read on export).

        Hits are the one event of every cached operation, so the cache counts them in C
        (kmsguard.fastpath.Budget) instead of reporting each one.
        """

    def cache_entries(self, source: Callable[[], Mapping[str, int]]) -> None:
        """A data-key cache's live entries per classification, read on export."""

    def failover(self, from_region: str, to_region: str) -> None:
        """An operation moved on from a failing region to the next."""

    def hedge(self, from_region: str, to_region: str) -> None:
        """A try in ``from_region`` had not answered within its hedge delay: the same call went to ``to_region``."""

    def hedge_won(self, from_region: str, to_region: str) -> None:
        """A hedge's answer came first: the try in ``from_region`` was abandoned."""

    def breakers(self, source: Callable[[], Mapping[str, str]]) -> None:
        """A multi-region keyring's breakers: region -> ``closed``, ``open`` or ``half-open``, read on export."""

    def gauge(self, name: str, value: float) -> None:
        """A level (audit queue depth, spool size, cache size) at the time of reporting."""

    def key_statuses(self, rows: Iterable[KeyStatus]) -> None:
        """Each key's rotation, from ``KeyAdmin.status`` (the service refreshes it in the background)."""

    def selftest_finished(self, failed_critical: int, failed_other: int) -> None:
        """A self-test run's failed checks (``/v1/selftest`` reports each run), for KmsguardSelftestFailing."""

    def http_request(self, method: str, route: str, status: str) -> None:
        """``kmsguard serve`` answered a request; ``route`` is the matched path template, never the raw path."""

    def export_dropped(self, samples: float) -> None:
        """The CloudWatch export dropped operation samples (its buffer was full, or PutMetricData failed)."""


NULL_TELEMETRY = Telemetry()


def of(observers: Iterable[object]) -> Telemetry:
    """The Telemetry among a Guard's observers (the registry, the OpenTelemetry bridge), as one."""
    parts = [o for o in observers if isinstance(o, Telemetry)]
    return parts[0] if len(parts) == 1 else Telemetries(parts) if parts else NULL_TELEMETRY


class Telemetries(Telemetry):
    """Several Telemetry at once (the Prometheus registry and the OpenTelemetry bridge): each gets every call."""

    def __init__(self, parts: list[Telemetry]) -> None:
        self.parts = parts

    def kms_call(
        self, api: str, region: str, outcome: str, duration: float, attempts: int = 1, throttles: int = 0
    ) -> None:
        for part in self.parts:
            part.kms_call(api, region, outcome, duration, attempts, throttles)

    def cache_event(self, event: str, classification: str) -> None:
        for part in self.parts:
            part.cache_event(event, classification)

    def cache_hits(self, source: Callable[[], Mapping[str, int]]) -> None:
        for part in self.parts:
            part.cache_hits(source)

    def cache_entries(self, source: Callable[[], Mapping[str, int]]) -> None:
        for part in self.parts:
            part.cache_entries(source)

    def failover(self, from_region: str, to_region: str) -> None:
        for part in self.parts:
            part.failover(from_region, to_region)

    def hedge(self, from_region: str, to_region: str) -> None:
        for part in self.parts:
            part.hedge(from_region, to_region)

    def hedge_won(self, from_region: str, to_region: str) -> None:
        for part in self.parts:
            part.hedge_won(from_region, to_region)

    def breakers(self, source: Callable[[], Mapping[str, str]]) -> None:
        for part in self.parts:
            part.breakers(source)

    def gauge(self, name: str, value: float) -> None:
        for part in self.parts:
            part.gauge(name, value)

    def key_statuses(self, rows: Iterable[KeyStatus]) -> None:
        rows = list(rows)
        for part in self.parts:
            part.key_statuses(rows)

    def selftest_finished(self, failed_critical: int, failed_other: int) -> None:
        for part in self.parts:
            part.selftest_finished(failed_critical, failed_other)

    def http_request(self, method: str, route: str, status: str) -> None:
        for part in self.parts:
            part.http_request(method, route, status)

    def export_dropped(self, samples: float) -> None:
        for part in self.parts:
            part.export_dropped(samples)
