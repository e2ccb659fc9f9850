"""An application process writing rows while a rewrap runs: ``python -m tests.rotation.app DSN TABLE N SECONDS``.

Updates random rows of ids 1..N with fresh tokens of ``app-<id>-<k>`` for SECONDS, one row per
transaction, and prints the last plaintext it committed per row (JSON) when it stops.
"""

from __future__ import annotations

import json
import random
import sys
import time

import psycopg

from kmsguard import Guard


def main() -> None:
    dsn, table, n, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    written: dict[int, str] = {}
    rng = random.Random(7)
    deadline = time.monotonic() + seconds
    with Guard.from_env() as guard, psycopg.connect(dsn, autocommit=True) as conn:
        k = 0
        while time.monotonic() < deadline:
            row = rng.randint(1, n)
            k += 1
            plain = f"app-{row}-{k}"
            conn.execute(f"UPDATE {table} SET passport = %s WHERE id = %s", (guard.encrypt_text(plain, "pii"), row))
            written[row] = plain
            time.sleep(0.002)
    print(json.dumps(written))


if __name__ == "__main__":
    main()
