"""Guard with the local keyring against bare AES-GCM, encrypt and decrypt, 64 B to 1 MiB.

The baseline is ``cryptography``'s AESGCM with one reused key object and a fresh random
nonce per message: the least any envelope library could cost. Guard's extra work per
message is a fresh data key (generate + wrap under the local master key, two HKDFs), the
header and the commitment; on decrypt, parsing, unwrapping and the commitment check.
The ratio column (Guard/raw ops/s) shows how much of that matters at each size.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from bench.common import ops_per_second, size_label, table
from kmsguard import Guard
from kmsguard.keyrings.local import KEY_FILE_NAME, LocalKeyring
from kmsguard.policy import Policy

SIZES = (64, 1 << 10, 64 << 10, 1 << 20)
CONTEXT = {"booking": "ABC123"}


def main(seconds: float = 0.4) -> None:
    with tempfile.TemporaryDirectory(prefix="kmsguard-bench-") as home:
        keyring = LocalKeyring.create(Path(home) / KEY_FILE_NAME, ["general"])
        guard = Guard(Policy.defaults({"general": "local:general", "pii": "pii", "payment": "payment"}), keyring)
        aead = AESGCM(os.urandom(32))
        rows = []
        for size in SIZES:
            data = os.urandom(size)
            sealed = guard.encrypt(data, "general", CONTEXT)
            nonce = os.urandom(12)
            raw_sealed = aead.encrypt(nonce, data, None)
            g_enc = ops_per_second(lambda d=data: guard.encrypt(d, "general", CONTEXT), seconds)
            r_enc = ops_per_second(lambda d=data: aead.encrypt(os.urandom(12), d, None), seconds)
            g_dec = ops_per_second(lambda s=sealed: guard.decrypt(s, CONTEXT), seconds)
            r_dec = ops_per_second(lambda s=raw_sealed, n=nonce: aead.decrypt(n, s, None), seconds)
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
    print(table(headers, rows))
