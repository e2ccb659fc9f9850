"""Tamper-evident audit trail: records, hash chain, spool, sinks, verification.

``stack.build_observers`` calls :func:`build_observer`; the CLI calls :func:`open_sink`
and :func:`keys_for` to read and verify. See docs/audit.md.
"""

from __future__ import annotations

from kmsguard.audit.chain import AuditKeys
from kmsguard.audit.keys import audit_keys
from kmsguard.audit.lifecycle import shared_writer
from kmsguard.audit.record import AuditRecord
from kmsguard.audit.settings import AuditSettings
from kmsguard.audit.sink import JsonLinesSink, Query, Sink
from kmsguard.audit.writer import AuditObserver, DisabledAudit
from kmsguard.config import Settings
from kmsguard.errors import ConfigurationError
from kmsguard.keyrings.base import Keyring
from kmsguard.operation import Observer
from kmsguard.telemetry import NULL_TELEMETRY, Telemetry

__all__ = [
    "AuditKeys",
    "AuditObserver",
    "AuditRecord",
    "AuditSettings",
    "Query",
    "Sink",
    "build_observer",
    "keys_for",
    "open_sink",
]


def open_sink(config: AuditSettings) -> Sink:
    if config.sink == "sqlite":
        from kmsguard.audit.sqlite import SqliteSink

        return SqliteSink(config.path)
    if config.sink == "postgres":
        try:
            from kmsguard.audit.postgres import PostgresSink
        except ImportError:
            raise ConfigurationError(
                'audit.sink: "postgres" needs psycopg; install kmsguard[postgres]'
            ) from None

        assert config.dsn is not None
        return PostgresSink(config.dsn, config.schema, config.connect_timeout)
    if config.sink == "jsonl":
        return JsonLinesSink(config.path)
    raise ConfigurationError('audit.sink: "none" keeps no records to read')


def keys_for(settings: Settings, keyring: Keyring, sink: Sink) -> AuditKeys:
    return audit_keys(keyring, settings.policy, sink)


def build_observer(settings: Settings, keyring: Keyring, telemetry: Telemetry = NULL_TELEMETRY) -> Observer:
    """The audit observer for a Guard: this process's shared writer for these settings (see lifecycle.py)."""
    config = AuditSettings.of(settings)
    if config.sink == "none":
        return DisabledAudit()

    def make() -> AuditObserver:
        sink = open_sink(config) if config.delivery == "thread" else None

        def keys() -> AuditKeys:
            assert sink is not None
            return keys_for(settings, keyring, sink)

        return AuditObserver(
            sink,
            keys,
            config.spool_dir,
            delivery=config.delivery,
            env=settings.env,
            flush_interval=config.flush_interval,
            max_spool_bytes=config.max_spool_bytes,
            principal=settings.principal,
            telemetry=telemetry,
            close_timeout=config.close_timeout,
        )

    destination = (config.sink, config.path, config.dsn, config.schema)
    options = (config.delivery, config.flush_interval, config.max_spool_bytes, settings.principal)
    return shared_writer((config.spool_dir, destination, options), make)
