"""1 KiB encrypt and decrypt through Guard on a cache hit, against bare AES-GCM in the same run.

The baseline is ``cryptography``'s AESGCM with a reused key object and a fresh random
nonce per message: the least any envelope can cost. Guard adds the header, the key
commitment check, the policy and the cache lookup. Targets: encrypt >= 0.6x, decrypt >= 0.4x.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from bench.common import best_us, table
from kmsguard import Guard
from kmsguard.keyrings.caching import CachingKeyring
from kmsguard.keyrings.local import LocalKeyring
from kmsguard.policy import Policy

SIZE = 1024
NUMBER = 10_000
REPEAT = 15


def _pair(baseline: Callable[[], object], guard: Callable[[], object]) -> tuple[float, float]:
    """Best-of-REPEAT microseconds per call for both, timed alternately so load hits both alike."""
    best_base, best_guard = _best(baseline, guard)
    return best_base, best_guard


def _best(*calls: Callable[[], object]) -> list[float]:
    """Best-of-REPEAT microseconds per call for each, timed in turn so load hits all alike."""
    return best_us(calls, REPEAT, NUMBER)


def measure() -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        names = ("general", "pii", "payment")
        keyring = LocalKeyring.create(Path(tmp) / "keyring.json", names)
        policy = Policy.defaults({n: f"local:{n}" for n in names})
        guard = Guard(policy, CachingKeyring(keyring, policy))
        data = os.urandom(SIZE)
        context = {"tenant": "t-42"}

        aead = AESGCM(os.urandom(32))
        aad = os.urandom(64)
        nonce = os.urandom(12)
        sealed_raw = aead.encrypt(nonce, data, aad)
        sealed = guard.encrypt(data, "general", context)
        guard.decrypt(sealed, context)  # warm both caches

        base_enc, guard_enc = _pair(
            lambda: aead.encrypt(os.urandom(12), data, aad), lambda: guard.encrypt(data, "general", context)
        )
        base_dec, guard_dec = _pair(
            lambda: aead.decrypt(nonce, sealed_raw, aad), lambda: guard.decrypt(sealed, context)
        )
    return {
        "aesgcm_encrypt_us": base_enc,
        "guard_encrypt_us": guard_enc,
        "encrypt_ratio": base_enc / guard_enc,
        "aesgcm_decrypt_us": base_dec,
        "guard_decrypt_us": guard_dec,
        "decrypt_ratio": base_dec / guard_dec,
    }


def measure_from_env() -> dict[str, float]:
    """The same, through what a newcomer gets: ``Guard.from_env()`` on default settings (audit, metrics on).

    Against AES-GCM, and against a Guard with no observers over the same keyring stack, so
    the last column is what default audit and metrics add to a cache hit.
    """
    with tempfile.TemporaryDirectory() as tmp:
        LocalKeyring.create(Path(tmp) / "keyring.json", ("general", "pii", "payment"))
        with Guard.from_env({"KMSGUARD_HOME": tmp}) as guard:
            bare = Guard(guard.policy, guard.keyring)
            data, context = os.urandom(SIZE), {"tenant": "t-42"}
            sealed = guard.encrypt(data, "general", context)
            for g in (guard, bare):
                for _ in range(3):
                    g.encrypt(data, "general", context)
                    g.decrypt(sealed, context)
            aead, aad, nonce = AESGCM(os.urandom(32)), os.urandom(64), os.urandom(12)
            sealed_raw = aead.encrypt(nonce, data, aad)
            out: dict[str, float] = {}
            for op, base, plain, observed in (
                ("encrypt", lambda: aead.encrypt(os.urandom(12), data, aad),
                 lambda: bare.encrypt(data, "general", context), lambda: guard.encrypt(data, "general", context)),
                ("decrypt", lambda: aead.decrypt(nonce, sealed_raw, aad),
                 lambda: bare.decrypt(sealed, context), lambda: guard.decrypt(sealed, context)),
            ):
                base_us, plain_us, env_us = _best(base, plain, observed)
                out[f"{op}_ratio"] = base_us / env_us
                out[f"{op}_cost"] = env_us / plain_us - 1
                out[f"{op}_us"] = env_us
    return out


def main() -> None:
    r = measure()
    rows = [
        [
            op,
            f"{r[f'aesgcm_{op}_us']:.2f}",
            f"{r[f'guard_{op}_us']:.2f}",
            f"{r[f'{op}_ratio']:.2f}",
            target,
        ]
        for op, target in (("encrypt", ">= 0.6"), ("decrypt", ">= 0.4"))
    ]
    print(f"{SIZE} B on a cache hit, best of {REPEAT} x {NUMBER:,} calls, baseline and Guard alternating")
    print(table(["op", "AESGCM us", "Guard us", "ratio (AESGCM/Guard)", "target"], rows))
    e = measure_from_env()
    rows = [[op, f"{e[f'{op}_us']:.2f}", f"{e[f'{op}_ratio']:.2f}", f"{e[f'{op}_cost'] * 100:.0f}%"]
            for op in ("encrypt", "decrypt")]
    print("Guard.from_env(), default settings (audit + metrics on), same cache hit:")
    print(table(["op", "Guard us", "ratio (AESGCM/Guard)", "audit + metrics cost"], rows))


if __name__ == "__main__":
    main()
