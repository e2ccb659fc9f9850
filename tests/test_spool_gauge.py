"""``kmsguard_audit_spool_bytes`` has one meaning wherever it is reported.

A running writer reports what its spool holds against ``max_spool_mb``; ``kmsguard
metrics`` reads the same quantity from disk, not the size of the (preallocated) files.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from click.testing import CliRunner

from kmsguard import Guard, metrics
from kmsguard.cli.main import cli
from kmsguard.keyrings.local import LocalKeyring

_GAUGE = re.compile(rb"^kmsguard_audit_spool_bytes (\S+)$", re.MULTILINE)


def spool_gauge(exposition: bytes) -> float:
    """The gauge's value; 0 until it is first set."""
    found = _GAUGE.search(exposition)
    return float(found[1]) if found else 0.0


def test_the_cli_reports_the_spool_as_the_running_writer_does(keyring: LocalKeyring, home: Path) -> None:
    (home / "kmsguard.toml").write_text('[audit]\ndelivery = "thread"\nflush_interval = 0.05\n')
    with Guard.from_env({"KMSGUARD_HOME": str(home)}) as guard:
        for i in range(50):  # the newest segment is only removed once a newer one exists
            guard.encrypt(b"x", "general", {"i": str(i)})
        registry = metrics.of(guard.observers)
        assert registry is not None
        # The writer's timer sets the gauge, possibly before its last records reach the spool
        # (a loaded machine): wait until it is set and holds still for many flush intervals.
        deadline, live, previous = time.monotonic() + 30, 0.0, -1.0
        while (live := spool_gauge(registry.exposition())) == 0.0 or live != previous:
            assert time.monotonic() < deadline, "the writer never reported a steady spool"
            previous = live
            time.sleep(0.5)

        result = CliRunner(env={"KMSGUARD_AUDIT_SINK": "none"}).invoke(cli, ["metrics"])
        assert result.exit_code == 0, result.output
        from_disk = spool_gauge(result.output.encode())
        # Both count the newest segment up to its last frame, not the preallocated file:
        # they differ at most by zero bytes that end the last frame.
        assert 0 < from_disk <= live < from_disk + 16
        assert live < 1 << 20  # far below one preallocated segment
