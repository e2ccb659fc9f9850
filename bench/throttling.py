"""Throttling on 30% of KMS calls: how many of 1,000 operations fail (target: none).

The proxy answers ThrottlingException to a seeded 30% of the KMS calls that reach it.
Operations are half encrypts, then decrypts of them, as batches with 16 threads;
production preset (3 attempts, 10 s operation deadline here). kmsguard retries a
throttled call with full-jitter backoff until the operation's deadline
(:mod:`kmsguard.aws.retry`), so no operation should fail:

* with the default cache (as a service runs), 1,000 operations make a handful of KMS
  calls (payment's limits, 100 messages per data key, make the most);
* with data-key reuse off every operation is a KMS call (plus its retries);
* with two regions a call throttled ``max_attempts`` times fails over to the other
  region, and when both throttle the keyring goes round them again.

``retries`` are the retries kmsguard made (``ClientFactory.stats``).
"""

from __future__ import annotations

import time

from bench.common import table
from bench.local_kms import factory, local_regions, multi_region
from kmsguard import Guard
from kmsguard.keyrings.aws_kms import AwsKmsKeyring
from kmsguard.keyrings.base import Keyring
from kmsguard.keyrings.caching import CachingKeyring
from kmsguard.policy import DEFAULT_CACHE_LIMITS, CacheLimits, ClassPolicy, Policy
from kmsguard.testing.replicas import create_multi_region_key

RATE = 0.3


def main() -> None:
    rows = []
    with local_regions("us-east-1", "eu-west-1") as regions:
        key = create_multi_region_key(regions[0], [regions[1]])
        off = CacheLimits(reuse=False, decrypt_ttl=0)
        general, payment = DEFAULT_CACHE_LIMITS["general"], DEFAULT_CACHE_LIMITS["payment"]
        setups: list[tuple[str, CacheLimits, int, int, int]] = [
            ("one region, cache on (general defaults)", general, 1, 3, 1000),
            ("one region, cache on (payment defaults)", payment, 1, 3, 1000),
            ("one region, cache on (payment), max_attempts = 5", payment, 1, 5, 1000),
            ("two regions, cache on (payment defaults)", payment, 2, 3, 1000),
            ("one region, cache off", off, 1, 3, 1000),
            ("two regions, cache off", off, 2, 3, 1000),
        ]
        for label, limits, n_regions, attempts, total in setups:
            half = total // 2
            used = regions[:n_regions]
            clients = factory(used, max_attempts=attempts)
            inner: Keyring = multi_region(clients) if n_regions > 1 else AwsKmsKeyring(clients, used[0].name)
            policy = Policy([ClassPolicy("general", key, cache=limits)])
            guard = Guard(policy, CachingKeyring(inner, policy))
            for region in used:
                region.proxy.clear()
                region.proxy.reset_counts()
                region.proxy.throttle(rate=RATE)
            t0 = time.perf_counter()
            sealed = guard.encrypt_many([b"m%d" % i for i in range(half)], "general", max_concurrency=16)
            opened = guard.decrypt_many([r.value for r in sealed if r.value is not None], max_concurrency=16)
            elapsed = time.perf_counter() - t0
            failures = sum(not r.ok for r in sealed) + sum(not r.ok for r in opened) + (half - len(opened))
            calls = sum(r.proxy.counts.total() for r in used)
            throttled = sum(r.proxy.statuses[400] for r in used)
            retries = clients.stats.total("retries")
            for region in used:
                region.proxy.clear()
            clients.close()
            codes = sorted({r.error.code for r in (*sealed, *opened) if r.error is not None})
            rows.append(
                [
                    label,
                    str(total),
                    str(calls),
                    str(throttled),
                    str(retries),
                    str(failures),
                    ", ".join(codes) or "-",
                    f"{elapsed:.1f}",
                ]
            )
    print(table(["setup", "operations", "KMS requests", "throttled", "retries", "failed", "errors", "seconds"], rows))


if __name__ == "__main__":
    main()
