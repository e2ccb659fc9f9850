"""The ``[selftest]`` table: how many iterations, and the thresholds the checks hold a deployment to.

::

    [selftest]
    iterations = 20           # latency: operations per classification, cold and warm each
    cold_p99_ms = 500         # latency: p99 of a cold operation (a real key-service call)
    warm_p99_ms = 5           # latency: p99 of a warm operation (a data-key cache hit)
    spool_warn_mb = 16        # audit: undelivered spool above this warns
    audit_timeout = 10        # audit: seconds the sink has to take the self-test's records
    credentials_warn_minutes = 15   # credentials: temporary credentials expiring sooner warn

Defaults depend on ``environment`` (:data:`DEFAULTS`): production holds the tightest
thresholds, development the loosest (a laptop, a shared CI runner). Every value is
validated through :class:`~kmsguard.config_table.ConfigTable`, so a typo is a
CONFIGURATION_ERROR naming ``selftest.<setting>``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from kmsguard.config import Settings
from kmsguard.config_table import ConfigTable

_FIELDS = {"iterations", "cold_p99_ms", "warm_p99_ms", "spool_warn_mb", "audit_timeout", "credentials_warn_minutes"}


@dataclass(frozen=True)
class SelftestSettings:
    iterations: int
    cold_p99_ms: float
    warm_p99_ms: float
    spool_warn_bytes: int
    audit_timeout: float
    credentials_warn_minutes: float

    @classmethod
    def of(cls, settings: Settings) -> SelftestSettings:
        table = ConfigTable(settings.section("selftest"), "selftest", _FIELDS, settings.env)
        base = DEFAULTS.get(settings.environment, DEFAULTS["development"])
        return cls(
            iterations=table.integer("iterations", base.iterations, minimum=1, maximum=10_000),
            cold_p99_ms=table.number("cold_p99_ms", base.cold_p99_ms, above=0),
            warm_p99_ms=table.number("warm_p99_ms", base.warm_p99_ms, above=0),
            spool_warn_bytes=table.integer("spool_warn_mb", base.spool_warn_bytes >> 20, minimum=1) << 20,
            audit_timeout=table.number("audit_timeout", base.audit_timeout, above=0, maximum=600),
            credentials_warn_minutes=table.number(
                "credentials_warn_minutes", base.credentials_warn_minutes, minimum=0, maximum=24 * 60
            ),
        )


#: Per environment. production: what a card-data path must meet; development: what a laptop does.
DEFAULTS: Mapping[str, SelftestSettings] = {
    "development": SelftestSettings(10, 2000.0, 50.0, 64 << 20, 10.0, 15.0),
    "staging": SelftestSettings(20, 1000.0, 10.0, 32 << 20, 10.0, 15.0),
    "production": SelftestSettings(20, 500.0, 5.0, 16 << 20, 10.0, 15.0),
}
