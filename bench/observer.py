"""What an observer of your own costs on a cache hit: one that does nothing, against none, in the same run.

A cache-hit 1 KiB encrypt and decrypt through Guard with no observers, and through an
identical Guard whose one observer's ``observe`` returns at once: the difference is
what the observer interface itself costs (building the event, the call). Timed
alternately, best of REPEAT x NUMBER calls each. Target: encrypt <= 10%.
"""

from __future__ import annotations

import os
import tempfile
import timeit
from collections.abc import Callable
from pathlib import Path

from bench.common import table
from kmsguard import Guard
from kmsguard.fastpath import OperationEvent
from kmsguard.keyrings.caching import CachingKeyring
from kmsguard.keyrings.local import LocalKeyring
from kmsguard.policy import Policy

SIZE = 1024
NUMBER = 10_000
REPEAT = 15


class Nop:
    """An observer that does nothing."""

    def observe(self, event: OperationEvent) -> None:
        pass


def _pair(plain: Callable[[], object], observed: Callable[[], object]) -> tuple[float, float]:
    """Best-of-REPEAT microseconds per call for both, timed alternately so load hits both alike."""
    best_plain = best_observed = float("inf")
    for _ in range(REPEAT):
        best_plain = min(best_plain, timeit.timeit(plain, number=NUMBER) / NUMBER * 1e6)
        best_observed = min(best_observed, timeit.timeit(observed, number=NUMBER) / NUMBER * 1e6)
    return best_plain, best_observed


def measure() -> dict[str, tuple[float, float]]:
    with tempfile.TemporaryDirectory() as tmp:
        names = ("general", "pii", "payment")
        keyring = LocalKeyring.create(Path(tmp) / "keyring.json", names)
        policy = Policy.defaults({n: f"local:{n}" for n in names})
        ring = CachingKeyring(keyring, policy)
        plain, observed = Guard(policy, ring), Guard(policy, ring, observers=[Nop()])
        data, context = os.urandom(SIZE), {"tenant": "t-42"}
        sealed = plain.encrypt(data, "general", context)
        for guard in (plain, observed):  # the plans, lanes and (observed) the hit's kind
            for _ in range(3):
                guard.encrypt(data, "general", context)
                guard.decrypt(sealed, context)
        return {
            "encrypt": _pair(lambda: plain.encrypt(data, "general", context),
                             lambda: observed.encrypt(data, "general", context)),
            "decrypt": _pair(lambda: plain.decrypt(sealed, context), lambda: observed.decrypt(sealed, context)),
        }


def main() -> None:
    r = measure()
    rows = [
        [op, f"{r[op][0]:.2f}", f"{r[op][1]:.2f}", f"{(r[op][1] / r[op][0] - 1) * 100:.0f}%", target]
        for op, target in (("encrypt", "<= 10%"), ("decrypt", "-"))
    ]
    print(f"{SIZE} B on a cache hit, best of {REPEAT} x {NUMBER:,} calls, alternating")
    print(table(["op", "no observer us", "no-op observer us", "cost", "target"], rows))


if __name__ == "__main__":
    main()
