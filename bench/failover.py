"""Failover: the primary region dead (connection refused, then blackholed) vs healthy.

Two local regions (each a moto process behind its own proxy) and an emulated
multi-region key; data-key reuse off, so each of the 1,000 encrypts calls
GenerateDataKey. The primary is killed at its proxy before the run: ``refuse`` closes
the port, ``blackhole`` leaves connects hanging until the connect timeout (1 s, 3
attempts). The breaker opens after 3 consecutive failures; "after" excludes the
operations before it opened. Target: p99 after the first failure <= 2x healthy p99.
"""

from __future__ import annotations

import statistics
import time

from bench.common import table
from bench.local_kms import factory, local_regions, multi_region
from kmsguard import Guard
from kmsguard.policy import CacheLimits, ClassPolicy, Policy
from kmsguard.testing.replicas import create_multi_region_key

N = 1000
FAILURES = 3


def _run(guard: Guard) -> list[float]:
    times = []
    for _ in range(N):
        t0 = time.perf_counter()
        guard.encrypt(b"x" * 1024, "general", {"tenant": "t1"})
        times.append(time.perf_counter() - t0)
    return times


def _ms(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] * 1000


def main() -> None:
    rows = []
    with local_regions("us-east-1", "eu-west-1") as regions:
        primary, replica = regions
        key = create_multi_region_key(primary, [replica])
        policy = Policy([ClassPolicy("general", key, cache=CacheLimits(reuse=False, decrypt_ttl=0))])
        healthy_p99 = 0.0
        for scenario in ("healthy", "refuse", "blackhole"):
            clients = factory(regions)
            guard = Guard(policy, multi_region(clients, failures=FAILURES, cooldown=600.0))
            guard.encrypt(b"warm", "general", {"tenant": "t1"})  # connections and alias-free warm-up
            if scenario != "healthy":
                primary.proxy.outage(scenario)  # type: ignore[arg-type]
            times = _run(guard)
            primary.proxy.restore()
            clients.close()
            after = times[FAILURES:] if scenario != "healthy" else times
            if scenario == "healthy":
                healthy_p99 = _ms(times, 99)
            rows.append(
                [
                    scenario,
                    f"{_ms(times, 50):.2f}",
                    f"{_ms(times, 99):.2f}",
                    f"{_ms(after, 50):.2f}",
                    f"{_ms(after, 99):.2f}",
                    f"{max(times) * 1000:.0f}",
                    f"{_ms(after, 99) / healthy_p99:.2f}x",
                ]
            )
    headers = ["primary", "p50 ms", "p99 ms", "p50 after", "p99 after", "max ms", "p99 after / healthy"]
    print(table(headers, rows))


if __name__ == "__main__":
    main()
