"""What the CloudWatch export's operational metrics cost a cache-hit encrypt: the export with them, against the
same export without them, in the same run.

A cache-hit 1 KiB encrypt through Guard with metrics and a CloudWatch export (EMF lines to
a file) whose background thread flushes every FLUSH seconds, 200x more often than the
default 10 s, so that its reading of the registry (``Metrics.cloudwatch_levels``) competes
with the caller as much as it ever can. The two exports differ only in that reading: it
adds nothing to the operation, so the target is no difference beyond noise. Timed
alternately, best of REPEAT x NUMBER calls each; no observers at all as the reference.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from bench.common import best_us, table
from kmsguard import Guard
from kmsguard.keyrings.caching import CachingKeyring
from kmsguard.keyrings.local import LocalKeyring
from kmsguard.metrics import CloudWatchExport, Metrics
from kmsguard.policy import Policy

SIZE = 1024
NUMBER = 5_000
REPEAT = 40
FLUSH = 0.05


def measure() -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        names = ("general", "pii", "payment")
        keyring = LocalKeyring.create(Path(tmp) / "keyring.json", names)
        policy = Policy.defaults({n: f"local:{n}" for n in names})
        configs: dict[str, Guard] = {"no observers": Guard(policy, CachingKeyring(keyring, policy))}
        for label, levels in (("metrics + export, operation samples only", False),
                              ("metrics + export with the operational metrics", True)):
            export = CloudWatchExport("bench", emf=open(Path(tmp) / f"{levels}.jsonl", "w"),  # noqa: SIM115
                                      flush_interval=FLUSH, max_buffer=1_000_000)
            metrics = Metrics(export)
            if not levels:
                export.levels = None
            ring = CachingKeyring(keyring, policy, telemetry=metrics)
            configs[label] = Guard(policy, ring, observers=[metrics])
        data, context = os.urandom(SIZE), {"tenant": "t-42"}
        for guard in configs.values():
            for _ in range(3):
                guard.encrypt(data, "general", context)
        times = best_us([lambda g=g: g.encrypt(data, "general", context) for g in configs.values()], REPEAT, NUMBER)
        for guard in configs.values():
            guard.close()
        return dict(zip(configs, times, strict=True))


def main() -> None:
    r = measure()
    base = r["metrics + export, operation samples only"]
    rows = [[label, f"{us:.2f}", f"{(us / base - 1) * 100:+.0f}%"] for label, us in r.items()]
    print(f"{SIZE} B encrypt on a cache hit, flush every {FLUSH} s, best of {REPEAT} x {NUMBER:,} calls, in turn")
    print(table(["configuration", "us/op", "against the export without them"], rows))


if __name__ == "__main__":
    main()
