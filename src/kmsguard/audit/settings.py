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
    close_timeout = 2.0        # seconds Guard.close() waits for delivery (the rest stays spooled)

``KMSGUARD_AUDIT_SINK``, ``KMSGUARD_AUDIT_DSN`` and ``KMSGUARD_AUDIT_DELIVERY`` override
``sink``, ``dsn`` and ``delivery``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kmsguard.config import Settings
from kmsguard.config_table import ConfigTable

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
    "close_timeout",
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
    close_timeout: float = 2.0

    @classmethod
    def of(cls, settings: Settings) -> AuditSettings:
        audit = ConfigTable(settings.section("audit"), "audit", _FIELDS, settings.env)
        sink = audit.choice("sink", SINKS, "sqlite", var="KMSGUARD_AUDIT_SINK")
        dsn = audit.optional_string("dsn", var="KMSGUARD_AUDIT_DSN")
        if sink == "postgres" and not dsn:
            raise audit.error("dsn", "the postgres sink needs a dsn (or KMSGUARD_AUDIT_DSN)")
        return cls(
            sink=sink,
            path=settings.home / audit.string("path", _DEFAULT_FILE.get(sink, "audit.db")),
            dsn=dsn,
            schema=audit.string("schema", "kmsguard"),
            strict=audit.optional_boolean("strict"),
            delivery=audit.choice("delivery", DELIVERIES, "process", var="KMSGUARD_AUDIT_DELIVERY"),
            spool_dir=settings.home / audit.string("spool_dir", "audit-spool"),
            flush_interval=audit.number("flush_interval", 0.2, minimum=0.001, maximum=60),
            max_spool_bytes=audit.integer("max_spool_mb", 256, minimum=1) << 20,
            connect_timeout=audit.number("connect_timeout", 5.0, above=0),
            close_timeout=audit.number("close_timeout", 2.0, minimum=0, maximum=600),
        )
