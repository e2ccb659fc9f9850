"""Regenerate the known-answer vectors in this directory: ``python tests/vectors/generate.py``.

This is a second, deliberately independent implementation of envelope v1, written from
FORMAT.md with nothing but ``struct`` and ``cryptography``: it does not import kmsguard.
The tests then check kmsguard against the JSON it wrote, in both directions, so a change
to ``envelope.py`` that alters a single byte fails. Only regenerate on purpose (a new
vector), never to make a failing test pass: the committed bytes are the format.

Every input is derived from the vector's name with SHAKE-256, so a rerun writes the same
files byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

HERE = Path(__file__).resolve().parent


def det(label: str, n: int) -> bytes:
    """``n`` reproducible pseudo-random bytes named by ``label``."""
    return hashlib.shake_256(b"kmsguard test vector " + label.encode()).digest(n)


def hkdf(dek: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(dek)


def u16(n: int) -> bytes:
    return struct.pack(">H", n)


def context_section(context: dict[str, str]) -> bytes:
    pairs = sorted((k.encode("utf-8"), v.encode("utf-8")) for k, v in context.items())
    out = u16(len(pairs))
    for k, v in pairs:
        out += u16(len(k)) + k + u16(len(v)) + v
    assert len(out) <= 8192
    return out


def build(
    name: str,
    description: str,
    classification: str,
    context: dict[str, str],
    wrapped: list[tuple[str, str, bytes]],
    plaintext: bytes,
) -> dict[str, object]:
    dek, nonce = det(name + " dek", 32), det(name + " nonce", 12)
    enc_key, commitment = hkdf(dek, b"kmsguard v1 enc"), hkdf(dek, b"kmsguard v1 commit")
    header = b"KG\x01\x01" + bytes([len(classification)]) + classification.encode("ascii") + context_section(context)
    keys = bytes([len(wrapped)])
    for provider, ref, blob in wrapped:
        keys += bytes([len(provider)]) + provider.encode() + u16(len(ref)) + ref.encode() + u16(len(blob)) + blob
    aad = header + commitment + nonce
    body = AESGCM(enc_key).encrypt(nonce, plaintext, aad)
    return {
        "name": name,
        "description": description,
        "dek": dek.hex(),
        "nonce": nonce.hex(),
        "classification": classification,
        "context": context,
        "wrapped": [{"provider": p, "key_ref": r, "wrapped": b.hex()} for p, r, b in wrapped],
        "plaintext": plaintext.hex(),
        "enc_key": enc_key.hex(),
        "commitment": commitment.hex(),
        "aad": aad.hex(),
        "envelope": (header + keys + commitment + nonce + body).hex(),
    }


def local(name: str, version: int, label: str) -> tuple[str, str, bytes]:
    return ("local", f"local:{name}:v{version}", det(label, 60))


def aws(region: str, label: str) -> tuple[str, str, bytes]:
    arn = f"arn:aws:kms:{region}:111122223333:key/mrk-1234abcd12ab34cd56ef1234567890ab"
    return ("aws-kms", arn, det(label, 184))


def max_context() -> dict[str, str]:
    """Four pairs whose section, count included, is exactly 8192 bytes."""
    context = {f"k{i}": "" for i in range(4)}
    used = len(context_section(context))
    context["k3"] = "v" * (8192 - used)
    assert len(context_section(context)) == 8192
    return context


def vectors() -> list[dict[str, object]]:
    return [
        build(
            "empty-plaintext",
            "A zero-length plaintext: the body is the 16-byte tag alone.",
            "general",
            {"note": "empty"},
            [local("general", 1, "w1")],
            b"",
        ),
        build(
            "empty-context",
            "No context pairs: the context section is the two bytes 00 00.",
            "general",
            {},
            [local("general", 1, "w2")],
            b"hello, kmsguard",
        ),
        build(
            "non-ascii-context",
            "UTF-8 keys and values, sorted by UTF-8 bytes: U+FF61 sorts before U+1F600 "
            "(UTF-16 code unit order would put it after).",
            "pii",
            {
                "passenger": "Zo\u00eb \u00d1\u00fa\u00f1ez",
                "\u57ce\u5e02": "\u6771\u4eac",
                "\U0001f600": "smile",
                "\uff61": "halfwidth",
                "Z": "upper before lower",
                "a": "",
            },
            [local("pii", 3, "w3")],
            b"P1234567",
        ),
        build(
            "several-wrapped-keys",
            "Three wrapped copies of one data key (two AWS regions and the local keyring); "
            "none of them is in the associated data.",
            "payment",
            {"purpose": "refund", "booking": "ABC123"},
            [aws("eu-west-1", "w4a"), aws("us-east-1", "w4b"), local("payment", 2, "w4c")],
            b"4111111111111111",
        ),
        build(
            "max-context",
            "The largest context: the section, its u16 count included, is exactly 8192 bytes.",
            "general",
            max_context(),
            [local("general", 1, "w5")],
            b"max context",
        ),
        build(
            "one-mib-plaintext",
            "A 1 MiB plaintext (byte i is i mod 251).",
            "general",
            {"purpose": "bulk"},
            [local("general", 1, "w6")],
            bytes(i % 251 for i in range(1 << 20)),
        ),
        build(
            "header-limits",
            "Every header field at its maximum: 32-character classification, 8 wrapped keys, "
            "a 32-character provider, a 2048-character key reference and a 4096-byte wrapped key.",
            "a" * 16 + "0123456789_-zzzz",
            {"k": "v"},
            [("x" * 31 + "-", "~" + "!" * 2046 + "~", det("w7 big", 4096))]
            + [local("general", v, f"w7 {v}") for v in range(1, 8)],
            b"limits",
        ),
    ]


def main() -> None:
    for vector in vectors():
        path = HERE / f"{vector['name']}.json"
        # Compact, one object per file: the 1 MiB vector is as small as hex allows.
        path.write_text(json.dumps(vector, separators=(",", ":")) + "\n", encoding="ascii")
        print(f"wrote {path.name} ({path.stat().st_size} bytes)", file=sys.stderr)


if __name__ == "__main__":
    main()
