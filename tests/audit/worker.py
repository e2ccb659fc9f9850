"""A writer process for the multi-process audit tests: ``python -m tests.audit.worker N close|hang``.

It encrypts N records (payment, and general ones that are mostly cache hits), prints ``returned N`` once every operation
has returned, then either closes the Guard (ending its chain) or hangs to be killed.
"""

from __future__ import annotations

import sys
import time

from kmsguard import Guard


def main() -> None:
    count, mode = int(sys.argv[1]), sys.argv[2]
    guard = Guard.from_env()
    for i in range(count):
        if i % 5 == 0:
            guard.encrypt(b"worker payment data", "payment", {"purpose": "test", "n": str(i)})
        else:
            guard.encrypt(b"worker data", "general", {"n": str(i % 3)})  # mostly cache hits: compact frames
    print(f"returned {count}", flush=True)
    if mode == "hang":
        time.sleep(600)
    guard.close()


if __name__ == "__main__":
    main()
