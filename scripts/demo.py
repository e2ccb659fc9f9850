"""``make demo``: the main job on the embedded local keyring, through the real CLI.

Initialises $KMSGUARD_HOME (``./.kmsguard`` under make) unless a keyring is already there,
then encrypts and decrypts one flight-booking record per classification with
``kmsguard`` subprocesses, showing each token and what ``kmsguard inspect`` reveals
without any key, and ends with ``kmsguard selftest`` on that home (exit 1 if it fails).
Rerunnable: an existing keyring is reused, never overwritten.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

RECORDS = [
    ("general", "seat note", b"Window seat 14A requested; vegetarian meal", {"booking": "ABC123"}),
    ("pii", "passport number", b"P<UTO L898902C3", {"booking": "ABC123", "passenger": "1"}),
    ("payment", "card number", b"4111 1111 1111 1111", {"booking": "ABC123", "purpose": "ticket-purchase"}),
]


def kmsguard(*args: str, data: bytes = b"", check: bool = True) -> subprocess.CompletedProcess[bytes]:
    proc = subprocess.run([sys.executable, "-m", "kmsguard", *args], input=data, capture_output=True)
    if check and proc.returncode != 0:
        sys.exit(f"kmsguard {' '.join(args)} failed ({proc.returncode}): {proc.stderr.decode().strip()}")
    return proc


def context_args(context: dict[str, str]) -> list[str]:
    return [arg for key, value in context.items() for arg in ("--context", f"{key}={value}")]


def main() -> None:
    home = Path(os.environ.get("KMSGUARD_HOME") or Path.home() / ".kmsguard")
    print(f"$ kmsguard init    (KMSGUARD_HOME={home})")
    if (home / "keyring.json").exists():
        print(f"  keyring already at {home / 'keyring.json'}; reusing it (init never overwrites one)")
    else:
        print("  " + kmsguard("init").stdout.decode().strip().replace("\n", "\n  "))

    for classification, what, plaintext, context in RECORDS:
        print(f"\n== {classification}: {what}")
        args = ["encrypt", "--class", classification, *context_args(context), "--text"]
        print(f"$ kmsguard {' '.join(args)}   <<< {plaintext.decode()!r}")
        token = kmsguard(*args, data=plaintext).stdout
        print(f"  {token.decode().strip()}")

        print("$ kmsguard inspect")
        print("  " + kmsguard("inspect", data=token).stdout.decode().strip().replace("\n", "\n  "))

        decrypt = ["decrypt", *context_args({k: v for k, v in context.items() if k == "purpose"})]
        print(f"$ kmsguard {' '.join(decrypt)}")
        opened = kmsguard(*decrypt, data=token).stdout
        print(f"  {opened.decode()!r}")
        if opened != plaintext:
            sys.exit("decrypted data differs from the original")

    print("\n== payment data without a purpose is refused")
    print("$ kmsguard decrypt   (no --context purpose=...)")
    token = kmsguard("encrypt", "--class", "payment", "--context", "purpose=refund", data=b"4111").stdout
    refused = kmsguard("decrypt", data=token, check=False)
    print(f"  exit {refused.returncode}: {refused.stderr.decode().strip()}")
    if refused.returncode != 1:
        sys.exit("expected the decrypt without a purpose to fail")
    print("\nDone: every record round-tripped through the CLI.")

    print("\n== is this install fit to hold such data? the self-test")
    print("$ kmsguard selftest")
    sys.stdout.flush()
    selftest = subprocess.run([sys.executable, "-m", "kmsguard", "selftest"], check=False)
    if selftest.returncode != 0:
        sys.exit(f"kmsguard selftest failed ({selftest.returncode})")


if __name__ == "__main__":
    main()
