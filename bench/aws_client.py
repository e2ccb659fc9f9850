"""The AWS client layer on its own: what the deadline costs, what it saves, and throttling.

Against a local KMS (moto) through kmsguard's proxy, over real HTTP:

* **deadline overhead**: GenerateDataKey calls/s through ``ClientFactory.call`` with the
  operation deadline on (the call runs on a worker thread, the caller waits with a
  timeout) and off (the caller's own thread), in the same run;
* **stalled endpoint**: seconds until the caller gets an error when the endpoint accepts
  and never answers: without a deadline (read timeout x attempts) vs kmsguard's deadline;
* **throttling**: 30% of requests answered ThrottlingException; calls that still failed
  after kmsguard's retries (waited out until the deadline, full-jitter backoff), and the
  latency the back-off adds (production preset: 3 attempts, 10 s deadline here).
"""

from __future__ import annotations

import statistics
import time

from bench.common import ops_per_second, table
from bench.local_kms import factory, local_regions
from kmsguard.aws import ClientFactory
from kmsguard.errors import KmsGuardError

THROTTLED_CALLS = 100


def _generate(clients: ClientFactory, arn: str) -> None:
    clients.call(clients.settings.region, "GenerateDataKey", KeyId=arn, KeySpec="AES_256")


def _time_to_error(clients: ClientFactory, arn: str) -> float:
    started = time.perf_counter()
    try:
        _generate(clients, arn)
    except KmsGuardError:
        return time.perf_counter() - started
    raise AssertionError("the stalled call succeeded")


def main() -> None:
    with local_regions("us-east-1") as (region,):
        arn = region.create_key()
        with_deadline, without = factory([region]), factory([region], operation_timeout=0)
        on = ops_per_second(lambda: _generate(with_deadline, arn), seconds=2.0)
        off = ops_per_second(lambda: _generate(without, arn), seconds=2.0)
        print(
            table(
                ["deadline", "GenerateDataKey/s", "ratio"],
                [["off", f"{off:,.0f}", "1.00"], ["on", f"{on:,.0f}", f"{on / off:.2f}"]],
            )
        )
        print()

        region.proxy.stall(60)
        slow = factory([region], max_attempts=2, read_timeout=3.0, operation_timeout=0)
        bounded = factory([region], max_attempts=2, read_timeout=3.0, operation_timeout=1.0)
        rows = [
            ["no deadline (2 attempts x 3 s read timeout)", f"{_time_to_error(slow, arn):.2f}"],
            ["operation_timeout = 1 s", f"{_time_to_error(bounded, arn):.2f}"],
        ]
        print(table(["stalled endpoint", "seconds to error"], rows))
        print()
        region.proxy.clear()

        region.proxy.throttle(rate=0.3)
        clients = factory([region])
        latencies, failures = [], 0
        for _ in range(THROTTLED_CALLS):
            started = time.perf_counter()
            try:
                _generate(clients, arn)
            except KmsGuardError:
                failures += 1
            latencies.append((time.perf_counter() - started) * 1000)
        latencies.sort()
        stats = clients.stats
        rows = [
            [
                str(THROTTLED_CALLS),
                str(failures),
                str(stats.total("throttles")),
                str(stats.total("retries")),
                f"{statistics.median(latencies):.1f}",
                f"{latencies[int(len(latencies) * 0.99) - 1]:.1f}",
            ]
        ]
        print(table(["calls (30% throttled)", "failed", "throttles", "retries", "p50 ms", "p99 ms"], rows))
        for c in (with_deadline, without, slow, bounded, clients):
            c.close()


if __name__ == "__main__":
    main()
