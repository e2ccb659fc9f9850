"""Field-level protection vs Powertools' DataMasking, and scan throughput.

A 20-field booking record (10 PII fields, 2 payment, 8 plain). kmsguard: ``protect``,
``unprotect`` and ``mask`` records/s with the data-key cache warm, under the same cache
limits as Powertools' defaults (and ``protect`` once more under kmsguard's own defaults). Powertools'
DataMasking (``aws-lambda-powertools[datamasking]``, the ``bench`` extra): ``erase`` of
the same 12 fields (plain, and with masking rules), and ``encrypt``/``decrypt`` of the
whole record (it has no per-field encryption) under its own default cache. Both talk to
the same local stand-in KMS (a moto server behind kmsguard's proxy), in the same run;
neither side has an audit log or metrics attached.

Then ``scan`` MB/s on one core over a generated JSON-lines file of booking log lines, one
in ten holding a sensitive value. ``BENCH_SCAN_MB`` sets its size (default 100).
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import ops_per_second, table
from bench.local_kms import factory, local_regions
from kmsguard import Guard
from kmsguard.detect.scan import scan_paths
from kmsguard.keyrings.aws_kms import AwsKmsKeyring
from kmsguard.keyrings.caching import CachingKeyring
from kmsguard.policy import DEFAULT_CACHE_LIMITS, CacheLimits, ClassPolicy, Policy

RECORD: dict[str, Any] = {
    "booking": "QX7K2P",
    "created": "2024-05-01T10:00:00Z",
    "status": "confirmed",
    "flight": "KG123",
    "cabin": "economy",
    "seat": "14C",
    "fare": 412.5,
    "currency": "EUR",
    "passenger": {
        "first_name": "Anna",
        "last_name": "Eriksson",
        "email": "anna.eriksson@example.com",
        "phone": "+46701234567",
        "passport": "L898902C3",
        "birth_date": "1974-08-12",
        "nationality": "SWE",
        "address": "Storgatan 1, 111 22 Stockholm",
        "loyalty_number": "KG-99812345",
        "emergency_phone": "+46707654321",
    },
    "card": {"number": "4111 1111 1111 1111", "holder": "ANNA ERIKSSON"},
}
PII = [f"$.passenger.{k}" for k in RECORD["passenger"]]
PAYMENT = ["$.card.number", "$.card.holder"]
FIELDS = {**dict.fromkeys(PII, "pii"), **dict.fromkeys(PAYMENT, "payment")}
CONTEXT = {"purpose": "checkout"}
#: Powertools' default data-key cache (5 minutes, 2^32 messages, no byte limit), for a like-for-like
#: comparison; kmsguard's defaults for pii and payment (1,000 and 100 messages per data key) make
#: a GenerateDataKey call every 100 and 50 records of this shape, measured on their own row.
AS_POWERTOOLS = CacheLimits(max_age=300.0, max_messages=2**32, max_bytes=2**62, decrypt_ttl=300.0)


def main() -> None:
    try:
        from aws_lambda_powertools.utilities.data_masking import DataMasking
        from aws_lambda_powertools.utilities.data_masking.provider.kms.aws_encryption_sdk import (
            AWSEncryptionSDKProvider,
        )
    except ImportError:
        print("needs the bench extra: make .venv/.installed-bench (pip install -e '.[bench]')")
        return
    with local_regions("us-east-1") as (region,):
        os.environ["AWS_ENDPOINT_URL_KMS"] = region.endpoint  # Powertools' own botocore session
        os.environ["AWS_DEFAULT_REGION"] = region.name
        keys = {c: region.create_key() for c in ("pii", "payment")}
        keyring = AwsKmsKeyring(factory([region]), region.name)

        def guard_with(limits: dict[str, CacheLimits]) -> Guard:
            purpose = frozenset({"purpose"})
            policy = Policy([ClassPolicy(c, keys[c], cache=limits[c], required_context=purpose) for c in keys])
            return Guard(policy, CachingKeyring(keyring, policy))

        guard = guard_with(dict.fromkeys(keys, AS_POWERTOOLS))
        strict = guard_with(dict(DEFAULT_CACHE_LIMITS))
        protected = guard.protect(RECORD, FIELDS, CONTEXT)
        assert guard.unprotect(protected, CONTEXT) == RECORD
        plain = DataMasking()
        rules = {p: {"custom_mask": "*****"} for p in FIELDS}
        masker = DataMasking(provider=AWSEncryptionSDKProvider(keys=[keys["pii"]]))
        sealed = masker.encrypt(RECORD)
        assert masker.decrypt(sealed) == RECORD
        rates = best_rates(
            {
                "protect": lambda: guard.protect(RECORD, FIELDS, CONTEXT),
                "protect, default limits": lambda: strict.protect(RECORD, FIELDS, CONTEXT),
                "unprotect": lambda: guard.unprotect(protected, CONTEXT),
                "mask": lambda: guard.mask(RECORD, list(FIELDS)),
                "erase": lambda: plain.erase(RECORD, fields=list(FIELDS)),
                "erase (masking rules)": lambda: plain.erase(RECORD, masking_rules=rules),
                "encrypt (whole record)": lambda: masker.encrypt(RECORD),
                "decrypt (whole record)": lambda: masker.decrypt(sealed),
            }
        )
    pairs = [
        ("mask", "erase", ">= 50x"),
        ("protect", "encrypt (whole record)", ">= 10x"),
        ("protect, default limits", "encrypt (whole record)", "-"),
        ("unprotect", "decrypt (whole record)", ">= 10x"),
        ("mask", "erase (masking rules)", "-"),
    ]
    rows = [
        [ours, f"{rates[ours]:,.0f}", theirs, f"{rates[theirs]:,.0f}", f"{rates[ours] / rates[theirs]:,.1f}x", target]
        for ours, theirs, target in pairs
    ]
    print("20-field booking record, 12 sensitive fields (10 pii, 2 payment), records/s, cache warm")
    print(table(["kmsguard", "records/s", "Powertools DataMasking", "records/s", "ratio", "target"], rows))
    print()
    scan_benchmark(int(os.environ.get("BENCH_SCAN_MB", "100")))


def best_rates(runs: dict[str, Callable[[], object]], rounds: int = 5, seconds: float = 0.4) -> dict[str, float]:
    """Each function's best calls/s over ``rounds`` interleaved rounds.

    Interleaving puts every contender under the same background load, and the best round
    is the one least disturbed by it, so the ratios hold on a shared machine.
    """
    best = dict.fromkeys(runs, 0.0)
    for _ in range(rounds):
        for name, fn in runs.items():
            best[name] = max(best[name], ops_per_second(fn, seconds))
    return best


def scan_benchmark(megabytes: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bookings.jsonl"
        size = write_log(path, megabytes << 20)
        start = time.process_time()
        report = scan_paths([path])
        cpu = time.process_time() - start
    mb = size / 1e6
    found = sum(report.counts().values())
    row = ["JSON lines", f"{mb:,.0f}", f"{found:,}", f"{cpu:.1f}", f"{mb / cpu:.1f}", ">= 20"]
    print(table(["file", "MB", "findings", "CPU s", "MB/s (one core)", "target"], [row]))


def write_log(path: Path, size: int) -> int:
    """Booking log lines up to ``size`` bytes; one in ten carries an email, a card or a phone number."""
    rng = random.Random(7)
    leaks = ["anna.eriksson@example.com", "4111 1111 1111 1111", "+46701234567"]
    written = 0
    with open(path, "w", encoding="utf-8") as out:
        n = 0
        while written < size:
            lines = []
            for _ in range(1000):
                n += 1
                line: dict[str, Any] = {
                    "ts": f"2024-05-01T10:{n // 60 % 60:02d}:{n % 60:02d}.{n % 1000:03d}Z",
                    "level": "INFO",
                    "request_id": f"{rng.getrandbits(128):032x}",
                    "booking": f"QX{n % 99991:05d}",
                    "event": "seat.assigned",
                    "order": 1000000000000000 + n,
                    "amount": round(rng.uniform(20, 900), 2),
                    "msg": "passenger checked in at gate B12, bags 2, total weight 31.5 kg",
                }
                if n % 10 == 0:
                    line["note"] = f"contact {leaks[n % 3]}"
                lines.append(json.dumps(line))
            chunk = "\n".join(lines) + "\n"
            out.write(chunk)
            written += len(chunk)
    return written
