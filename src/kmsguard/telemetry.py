"""Process-wide counters that keyrings and the AWS layer report to, and metrics export.

Per-operation facts go into the current :class:`~kmsguard.operation.Operation` (for the
audit record). Facts that are not about one operation — a KMS retry, a cache eviction,
a failover between regions, the audit queue depth — go to a :class:`Telemetry`, which
``stack`` builds once and hands to every component. The default does nothing, so a
component never checks whether anyone listens.

Labels are names only (API, region, classification, outcome); never context values,
key material or data.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping


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


NULL_TELEMETRY = Telemetry()


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
