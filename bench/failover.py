"""Failover under the default presets: the preferred region refused, blackholed, silent or slow, vs healthy.

Two local regions (each a moto process behind its own proxy) and an emulated
multi-region key; data-key reuse off, so every encrypt calls GenerateDataKey and every
decrypt calls Decrypt. The keyring is what ``backend = "aws"`` builds from a config that
names only the two regions and their endpoints (``environment`` = production, then
development): default timeouts, breaker and hedging. Faults are the preferred region's
proxy's:

* ``refuse`` — the port is closed (connection refused);
* ``blackhole`` — connects hang (a full listener) until the connect timeout;
* ``silent`` — connections are accepted and requests read, never answered (the issue's
  "blackholed": a partition behind a load balancer); from the start, or after half the run;
* ``slow`` — 300 ms added to every call of the preferred region.

Each row is one run of ``N`` encrypt + decrypt round trips (``N_SLOW`` for ``slow``).
"first" is the first operation after the fault began; "before" the operations before it
(mid-run rows only); "after" every operation from the sixth after the fault on. Extra
calls are KMS requests (both proxies) beyond one per operation; hedges and hedge wins
are the keyring's counts. Target (issue 16): no failure, the first operation within
2 s, p99 after <= 2x the healthy p99; hedges below 1% healthy, extra calls below 10%
once the delay has adapted to a slow region.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.common import table
from bench.local_kms import local_regions
from kmsguard import Guard, KmsGuardError
from kmsguard.config import load_settings
from kmsguard.policy import CacheLimits, ClassPolicy, Policy
from kmsguard.stack import build_aws_keyring
from kmsguard.telemetry import Telemetry
from kmsguard.testing import KmsRegion
from kmsguard.testing.replicas import create_multi_region_key

N = 200
N_SLOW = 60
#: How many operations after the fault began "after" leaves out.
SETTLING = 5


class Counts(Telemetry):
    def __init__(self) -> None:
        self.hedges = 0
        self.wins = 0

    def hedge(self, from_region: str, to_region: str) -> None:
        self.hedges += 1

    def hedge_won(self, from_region: str, to_region: str) -> None:
        self.wins += 1


def _ms(values: list[float], q: int) -> str:
    if len(values) < 2:
        return "-"
    return f"{statistics.quantiles(values, n=100, method='inclusive')[q - 1] * 1000:.1f}"


def _requests(regions: list[KmsRegion]) -> int:
    return sum(r.proxy.counts["GenerateDataKey"] + r.proxy.counts["Decrypt"] for r in regions)


def _run(
    regions: list[KmsRegion], key: str, environment: str, n: int, fault: Callable[[], None], at: int
) -> tuple[list[float], int, int, Counts]:
    """``n`` round trips with ``fault()`` called before round trip ``at``: (times, failures, extra calls, counts)."""
    counts = Counts()
    with tempfile.TemporaryDirectory() as home:
        endpoints = "\n".join(f'{r.name} = "{r.endpoint}"' for r in regions)
        names = ", ".join(f'"{r.name}"' for r in regions)
        config = f'backend = "aws"\nenvironment = "{environment}"\n[aws]\nregions = [{names}]\n'
        (Path(home) / "kmsguard.toml").write_text(f"{config}[aws.endpoints]\n{endpoints}\n")
        keyring = build_aws_keyring(load_settings({"KMSGUARD_HOME": home}), counts)
    guard = Guard(Policy([ClassPolicy("general", key, cache=CacheLimits(reuse=False, decrypt_ttl=0))]), keyring)
    for region in regions:
        region.proxy.reset_counts()
    times: list[float] = []
    failures = 0
    for i in range(n):
        if i == at:
            fault()
        t0 = time.perf_counter()
        try:
            sealed = guard.encrypt(b"x" * 1024, "general", {"tenant": "t1"})
            t1 = time.perf_counter()
            times.append(t1 - t0)
            guard.decrypt(sealed, {"tenant": "t1"})
            times.append(time.perf_counter() - t1)
        except KmsGuardError:
            failures += 1
            times.append(time.perf_counter() - t0)
    extra = _requests(regions) - len(times)
    keyring.close()  # type: ignore[attr-defined]
    for region in regions:
        region.proxy.restore()
        region.proxy.clear()
    return times, failures, extra, counts


def main() -> None:
    with local_regions("us-east-1", "eu-west-1") as regions:
        primary, replica = regions
        key = create_multi_region_key(primary, [replica])
        scenarios: list[tuple[str, int, Callable[[], None], int]] = [
            ("healthy", N, lambda: None, 0),
            ("refuse", N, lambda: primary.proxy.outage("refuse"), 0),
            ("blackhole", N, lambda: primary.proxy.outage("blackhole"), 0),
            ("silent", N, lambda: primary.proxy.outage("silent"), 0),
            ("silent mid-run", N, lambda: primary.proxy.outage("silent"), N // 2),
            ("slow (+300 ms)", N_SLOW, lambda: primary.proxy.latency(0.3), 0),
        ]
        for environment in ("production", "development"):
            rows = []
            healthy_p99 = 0.0
            for name, n, fault, at in scenarios:
                times, failures, extra, counts = _run(regions, key, environment, n, fault, at)
                start = 2 * at
                before, after = times[:start], times[start + SETTLING :]
                p99_after = statistics.quantiles(after, n=100, method="inclusive")[98]
                if name == "healthy":
                    healthy_p99 = p99_after
                rows.append(
                    [
                        name,
                        f"{times[start] * 1000:.0f}",
                        _ms(before, 50),
                        _ms(before, 99),
                        _ms(after, 50),
                        _ms(after, 99),
                        f"{p99_after / healthy_p99:.2f}x",
                        str(failures),
                        str(len(times)),
                        f"{extra} ({100 * extra / len(times):.1f}%)",
                        f"{counts.hedges}/{counts.wins}",
                    ]
                )
            print(f"environment = {environment}")
            headers = [
                "preferred region",
                "first ms",
                "p50 before",
                "p99 before",
                "p50 after",
                "p99 after",
                "p99 after / healthy",
                "failed",
                "operations",
                "extra calls",
                "hedges/won",
            ]
            print(table(headers, rows))
            print()


if __name__ == "__main__":
    main()
