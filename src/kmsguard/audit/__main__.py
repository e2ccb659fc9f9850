"""``python -m kmsguard.audit <spool_dir> <writer_id> <flush_interval>``: the deliverer process.

An AuditObserver with ``delivery = "process"`` starts it with its Settings' environment
and talks to it over stdin/stdout (see deliver.py). Not meant to be run by hand.
"""

from __future__ import annotations

import logging
import select
import sys
import time
from pathlib import Path

from kmsguard.audit.deliver import MAX_BACKOFF, Deliverer


def main(argv: list[str]) -> int:
    """Deliver until stdin closes; settings come from the environment."""
    from kmsguard.audit import AuditSettings, keys_for, open_sink
    from kmsguard.config import load_settings
    from kmsguard.stack import build_keyring

    logging.basicConfig(level=logging.WARNING, format="kmsguard audit deliverer: %(message)s")
    directory, writer_id, interval = Path(argv[0]), argv[1], float(argv[2])
    settings = load_settings()
    sink = open_sink(AuditSettings.of(settings))
    keyring = build_keyring(settings)

    def progress(seq: int) -> None:
        print(f"P {seq}", flush=True)

    deliverer = Deliverer(sink, lambda: keys_for(settings, keyring, sink), directory, writer_id, on_progress=progress)
    backoff, healthy = interval, True
    while True:
        ready, _, _ = select.select([sys.stdin], [], [], backoff)
        line = sys.stdin.readline() if ready else "flush"
        if not line:  # the writer closed or died
            deadline = time.monotonic() + 10
            while not deliverer.finish() and time.monotonic() < deadline:
                time.sleep(0.2)
            sink.close()
            return 0
        ok = deliverer.run_once()
        backoff = interval if ok else min(MAX_BACKOFF, max(backoff * 2, 0.05))
        if ok != healthy:
            healthy = ok
            print(f"H {int(ok)}", flush=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
