"""Guard with the local keyring against bare AES-GCM, encrypt and decrypt.

The baseline is ``cryptography``'s AESGCM with one reused key object and a fresh random
nonce per message: the least any envelope library could cost. The first table has no
cache, 64 B to 1 MiB: Guard's extra work per message is a fresh data key (generate + wrap
under the local master key, two HKDFs), the header and the commitment; on decrypt,
parsing, unwrapping and the commitment check. The second has the data-key cache warm and
no observers, 64 KiB to 8 MiB (documents and scans below the streaming threshold): what is
left is the envelope around one AES-GCM call. The ratio columns are Guard/raw ops/s.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from bench.common import ops_per_second, size_label, table
from kmsguard import Guard
from kmsguard.keyrings.caching import CachingKeyring
from kmsguard.keyrings.local import KEY_FILE_NAME, LocalKeyring
from kmsguard.policy import Policy

SIZES = (64, 1 << 10, 64 << 10, 1 << 20)
CACHED_SIZES = (64 << 10, 1 << 20, 8 << 20)
CONTEXT = {"booking": "ABC123"}


def main(seconds: float = 0.4) -> None:
    with tempfile.TemporaryDirectory(prefix="kmsguard-bench-") as home:
        keyring = LocalKeyring.create(Path(home) / KEY_FILE_NAME, ["general"])
        policy = Policy.defaults({"general": "local:general", "pii": "pii", "payment": "payment"})
        print("no cache")
        print(_table(Guard(policy, keyring), SIZES, seconds))
        print("\ncache warm, no observers")
        print(_table(Guard(policy, CachingKeyring(keyring, policy)), CACHED_SIZES, seconds))


def _table(guard: Guard, sizes: tuple[int, ...], seconds: float) -> str:
    """Guard against raw AES-GCM at each size, the two timed alternately (best of three each)."""
    aead = AESGCM(os.urandom(32))
    rows = []
    for size in sizes:
        data = os.urandom(size)
        sealed = guard.encrypt(data, "general", CONTEXT)
        nonce = os.urandom(12)
        raw_sealed = aead.encrypt(nonce, data, None)
        g_enc, r_enc = _alternately(
            lambda d=data: guard.encrypt(d, "general", CONTEXT),
            lambda d=data: aead.encrypt(os.urandom(12), d, None),
            seconds,
        )
        g_dec, r_dec = _alternately(
            lambda s=sealed: guard.decrypt(s, CONTEXT),
            lambda s=raw_sealed, n=nonce: aead.decrypt(n, s, None),
            seconds,
        )
        rows.append(
            [
                size_label(size),
                f"{g_enc:,.0f}",
                f"{r_enc:,.0f}",
                f"{g_enc / r_enc:.2f}",
                f"{g_dec:,.0f}",
                f"{r_dec:,.0f}",
                f"{g_dec / r_dec:.2f}",
            ]
        )
    headers = ["size", "Guard enc/s", "raw enc/s", "enc ratio", "Guard dec/s", "raw dec/s", "dec ratio"]
    return table(headers, rows)


def _alternately(guard: Callable[[], object], raw: Callable[[], object], seconds: float) -> tuple[float, float]:
    """Best of three ops/s for each, the two timed in turn, so a busy machine slows both alike."""
    g, r = 0.0, 0.0
    for _ in range(3):
        g = max(g, ops_per_second(guard, seconds / 3))
        r = max(r, ops_per_second(raw, seconds / 3))
    return g, r
