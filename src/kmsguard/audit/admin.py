"""Audit records for key management (``kmsguard keys create|rotate|disable|enable``).

These happen outside Guard, so they get their own Operation and writer. They are always
strict: a key change that cannot be recorded is refused before it is made (the spool
must be writable), and the record is on disk before the command reports success.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from kmsguard.config import Settings
from kmsguard.keyrings.base import Keyring
from kmsguard.operation import Operation


@contextmanager
def audited(settings: Settings, keyring: Keyring, name: str, classification: str) -> Iterator[Operation]:
    """Record ``name`` (e.g. ``keys.rotate``) around the block; the block adds the key refs it touched."""
    from kmsguard.audit import build_observer

    observer = build_observer(settings, keyring)
    op = Operation(name, classification, {}, settings.principal, strict_audit=True)
    try:
        try:
            yield op
        except BaseException as exc:
            op.finish(exc)
            observer.observe(op.event())
            raise
        op.finish(None)
        observer.observe(op.event())
    finally:
        closer = getattr(observer, "close", None)
        if callable(closer):
            closer()
