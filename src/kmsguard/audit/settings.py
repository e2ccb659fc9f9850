"""The ``[audit]`` table: which sink, where, and how strict. Validated here, not in config.py.

::

    [audit]
    sink = "sqlite"            # "sqlite" (default), "postgres", "jsonl" or "none"
    path = "audit.db"          # sqlite / jsonl file, relative to $KMSGUARD_HOME
    dsn = "postgresql://..."   # postgres (or KMSGUARD_AUDIT_DSN)
    schema = "kmsguard"        # postgres schema holding the tables
    strict = true              # override every classification's strict_audit (unset: per class)
    spool_dir = "audit-spool"  # relative to $KMSGUARD_HOME
    delivery = "process"       # deliver from a child process (default) or "thread" (one-shot commands)
    flush_interval = 0.2       # seconds between background deliveries (and spool fsyncs)
    max_spool_mb = 256         # full: wait for a working sink; sink down: drop non-strict (counted), refuse strict

``KMSGUARD_AUDIT_SINK``, ``KMSGUARD_AUDIT_DSN`` and ``KMSGUARD_AUDIT_DELIVERY`` override
``sink``, ``dsn`` and ``delivery``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kmsguard.config import Settings
from kmsguard.errors import ConfigurationError

SINKS = ("sqlite", "postgres", "jsonl", "none")
DELIVERIES = ("process", "thread")
_FIELDS = {
    "delivery",
    "sink",
    "path",
    "dsn",
    "schema",
    "strict",
    "spool_dir",
    "flush_interval",
    "max_spool_mb",
    "connect_timeout",
}
_DEFAULT_FILE = {"sqlite": "audit.db", "jsonl": "audit.jsonl"}


@dataclass(frozen=True)
class AuditSettings:
    sink: str
    path: Path
    dsn: str | None
    schema: str
    strict: bool | None
    delivery: str
    spool_dir: Path
    flush_interval: float
    max_spool_bytes: int
    connect_timeout: float

    @classmethod
    def of(cls, settings: Settings) -> AuditSettings:
        table = settings.section("audit")
        unknown = set(table) - _FIELDS
        if unknown:
            raise ConfigurationError(f"audit.{sorted(unknown)[0]}: unknown setting")
        sink = settings.env.get("KMSGUARD_AUDIT_SINK") or _get(table, "sink", str, "sqlite")
        if sink not in SINKS:
            raise ConfigurationError(f"audit.sink: must be one of {', '.join(SINKS)}, not {sink!r}")
        dsn = settings.env.get("KMSGUARD_AUDIT_DSN") or _get(table, "dsn", str, None)
        if sink == "postgres" and not dsn:
            raise ConfigurationError("audit.dsn: the postgres sink needs a dsn (or KMSGUARD_AUDIT_DSN)")
        delivery = settings.env.get("KMSGUARD_AUDIT_DELIVERY") or _get(table, "delivery", str, "process")
        if delivery not in DELIVERIES:
            raise ConfigurationError(f"audit.delivery: must be one of {', '.join(DELIVERIES)}, not {delivery!r}")
        flush = float(_get(table, "flush_interval", (int, float), 0.2))
        if not 0.001 <= flush <= 60:
            raise ConfigurationError("audit.flush_interval: must be between 0.001 and 60 seconds")
        max_mb = _get(table, "max_spool_mb", int, 256)
        if max_mb < 1:
            raise ConfigurationError("audit.max_spool_mb: must be at least 1")
        return cls(
            sink=sink,
            path=settings.home / _get(table, "path", str, _DEFAULT_FILE.get(sink, "audit.db")),
            dsn=dsn,
            schema=_get(table, "schema", str, "kmsguard"),
            strict=_get(table, "strict", bool, None),
            delivery=delivery,
            spool_dir=settings.home / _get(table, "spool_dir", str, "audit-spool"),
            flush_interval=flush,
            max_spool_bytes=max_mb << 20,
            connect_timeout=float(_get(table, "connect_timeout", (int, float), 5.0)),
        )


def _get(table: Any, name: str, kind: type | tuple[type, ...], default: Any) -> Any:
    value = table.get(name, default)
    if value is default:
        return value
    if isinstance(value, bool) and kind is not bool:
        raise ConfigurationError(f"audit.{name}: has the wrong type")
    if not isinstance(value, kind) or (isinstance(value, str) and not value):
        raise ConfigurationError(f"audit.{name}: has the wrong type")
    return value
