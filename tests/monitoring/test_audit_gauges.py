"""The audit gauges the alerts watch: delivery lag grows while the sink is down, and is 0 once delivered."""

from __future__ import annotations

import re
import time
from pathlib import Path

from kmsguard import Guard, metrics
from kmsguard.keyrings.local import LocalKeyring


def _gauge(guard: Guard, name: str) -> float | None:
    registry = metrics.of(guard.observers)
    assert registry is not None
    found = re.search(rb"^kmsguard_%s (\S+)$" % name.encode(), registry.exposition(), re.MULTILINE)
    return float(found[1]) if found else None


def _wait_for(guard: Guard, name: str, ok: object, what: str) -> float:
    deadline = time.monotonic() + 60
    while True:
        value = _gauge(guard, name)
        if value is not None and ok(value):  # type: ignore[operator]
            return value
        assert time.monotonic() < deadline, f"{name} never {what} (last {value})"
        time.sleep(0.05)


def test_the_delivery_lag_grows_while_the_sink_is_down(keyring: LocalKeyring, home: Path) -> None:
    (home / "kmsguard.toml").write_text(
        '[audit]\ndelivery = "thread"\nflush_interval = 0.05\nsink = "postgres"\n'
        'dsn = "postgresql://kmsguard@127.0.0.1:9/absent"\nconnect_timeout = 1\n'
    )
    with Guard.from_env({"KMSGUARD_HOME": str(home)}) as guard:
        guard.encrypt(b"x", "general")
        _wait_for(guard, "audit_delivery_lag_seconds", lambda v: v >= 1.0, "grew past 1 s")
        assert _gauge(guard, "audit_dropped_records") == 0.0
        guard.observers[0].close(timeout=0.5)  # type: ignore[attr-defined]  # undelivered records stay spooled


def test_the_delivery_lag_is_zero_once_records_are_delivered(keyring: LocalKeyring, home: Path) -> None:
    (home / "kmsguard.toml").write_text('[audit]\ndelivery = "thread"\nflush_interval = 0.05\n')
    with Guard.from_env({"KMSGUARD_HOME": str(home)}) as guard:
        for i in range(20):
            guard.encrypt(b"x", "general", {"i": str(i)})
        guard.observers[0].flush()  # type: ignore[attr-defined]
        _wait_for(guard, "audit_queue_depth", lambda v: v == 0, "drained")
        _wait_for(guard, "audit_delivery_lag_seconds", lambda v: v == 0, "returned to 0")
