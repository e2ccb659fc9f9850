"""KMS calls per 1,000 encrypts and per 1,000 decrypts, data-key cache off vs on.

Against a local KMS (moto) through kmsguard's proxy, which counts every call that
reaches it. Same classification and context for all 1,000 messages of 1 KiB; each
classification with its default cache limits, and ``general`` once more with the
cache off (``reuse = false``, ``decrypt_ttl = 0``). Decrypts open the 1,000 envelopes
just made. Targets with defaults: at most one GenerateDataKey per ``max_messages``
encrypts, one Decrypt per distinct data key.
"""

from __future__ import annotations

import os
import time

from bench.common import table
from bench.local_kms import factory, local_regions
from kmsguard import Guard
from kmsguard.keyrings.aws_kms import AwsKmsKeyring
from kmsguard.keyrings.caching import CachingKeyring
from kmsguard.policy import DEFAULT_CACHE_LIMITS, CacheLimits, ClassPolicy, Policy

N = 1000
OFF = CacheLimits(reuse=False, decrypt_ttl=0)
CONTEXTS = {"general": {"tenant": "t1"}, "pii": {"user": "42"}, "payment": {"purpose": "refund"}}


def main() -> None:
    data = os.urandom(1024)
    rows = []
    with local_regions("us-east-1") as (region,):
        clients = factory([region])
        keyring = AwsKmsKeyring(clients, region.name)
        runs = [(c, "on (defaults)", DEFAULT_CACHE_LIMITS[c]) for c in CONTEXTS] + [("general", "off", OFF)]
        for classification, mode, limits in runs:
            key = region.create_key()
            policy = Policy([ClassPolicy(classification, key, cache=limits)])
            guard = Guard(policy, CachingKeyring(keyring, policy))
            context = CONTEXTS[classification]
            region.proxy.reset_counts()
            t0 = time.perf_counter()
            sealed = [guard.encrypt(data, classification, context) for _ in range(N)]
            t_enc = time.perf_counter() - t0
            generate = region.proxy.counts.total()
            region.proxy.reset_counts()
            t0 = time.perf_counter()
            for s in sealed:
                guard.decrypt(s, context)
            t_dec = time.perf_counter() - t0
            decrypt = region.proxy.counts.total()
            rows.append(
                [
                    classification,
                    mode,
                    f"{limits.max_messages:,}" if limits.reuse else "-",
                    str(generate),
                    str(decrypt),
                    f"{t_enc * 1000 / N:.3f}",
                    f"{t_dec * 1000 / N:.3f}",
                ]
            )
        clients.close()
    headers = ["class", "cache", "max_messages", "KMS calls / 1k enc", "KMS calls / 1k dec", "ms/enc", "ms/dec"]
    print(table(headers, rows))


if __name__ == "__main__":
    main()
