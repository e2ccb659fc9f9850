"""``python -m kmsguard.audit <spool_dir> <writer_id> <flush_interval>``: the deliverer process.

An AuditObserver with ``delivery = "process"`` starts it with its Settings' environment
and talks to it over stdin/stdout (see deliver.py). Not meant to be run by hand.
"""

from __future__ import annotations

import contextlib
import logging
import select
import sys
from pathlib import Path

from kmsguard.audit.deliver import MAX_BACKOFF, Deliverer


class _ToWriter(logging.Handler):
    """Log records go to the writer (``L <level> <message>``), which logs them through the
    application's own logging: this process never prints to the application's stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        message = self.format(record).replace("\n", " ")
        _send(f"L {record.levelno} {message}")


def _send(line: str) -> None:
    with contextlib.suppress(BrokenPipeError, ValueError):  # the writer is gone; the spool stays for the next
        print(line, flush=True)


def main(argv: list[str]) -> int:
    """Deliver until stdin closes; settings come from the environment."""
    from kmsguard.audit import AuditSettings, keys_for, open_sink
    from kmsguard.config import load_settings
    from kmsguard.stack import build_keyring

    root = logging.getLogger()
    root.addHandler(_ToWriter())
    root.setLevel(logging.WARNING)
    directory, writer_id, interval = Path(argv[0]), argv[1], float(argv[2])
    settings = load_settings()
    sink = open_sink(AuditSettings.of(settings))
    keyring = build_keyring(settings)

    def progress(seq: int) -> None:
        _send(f"P {seq}")

    deliverer = Deliverer(sink, lambda: keys_for(settings, keyring, sink), directory, writer_id, on_progress=progress)
    backoff, failing = interval, False
    while True:
        ready, _, _ = select.select([sys.stdin], [], [], backoff)
        line = sys.stdin.readline() if ready else "flush"
        if not line:  # the writer closed or died: the rest, if delivery works (the writer bounds the wait)
            if deliverer.failure is None:
                deliverer.finish()
            sink.close()
            return 0
        ok = deliverer.run_once()
        backoff = interval if ok else min(MAX_BACKOFF, max(backoff * 2, 0.05))
        if not ok:
            _send(f"F {deliverer.failure}")
        elif failing:
            _send("H")
        failing = not ok


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
