"""Regenerate the suite-2 (stream) known-answer vectors: ``python tests/vectors/generate_stream.py``.

Like generate.py for suite 1, a second and deliberately independent implementation of
envelope suite 2, written from FORMAT.md with nothing but ``struct`` and ``cryptography``:
it does not import kmsguard. tests/test_stream_vectors.py checks kmsguard against the
JSON it writes into ``stream/``, in both directions. Only regenerate on purpose (a new
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

HERE = Path(__file__).resolve().parent / "stream"


def det(label: str, n: int) -> bytes:
    """``n`` reproducible pseudo-random bytes named by ``label``."""
    return hashlib.shake_256(b"kmsguard stream vector " + label.encode()).digest(n)


def hkdf(dek: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(dek)


def u16(n: int) -> bytes:
    return struct.pack(">H", n)


def build(name: str, description: str, segment_size: int, size: int, context: dict[str, str]) -> dict[str, object]:
    dek, prefix = det(name + " dek", 32), det(name + " prefix", 7)
    plaintext = det(name + " plaintext", size)
    enc_key, commitment = hkdf(dek, b"kmsguard stream enc"), hkdf(dek, b"kmsguard stream commit")
    classification = "general"
    pairs = sorted((k.encode("utf-8"), v.encode("utf-8")) for k, v in context.items())
    ctx = u16(len(pairs)) + b"".join(u16(len(k)) + k + u16(len(v)) + v for k, v in pairs)
    header = b"KG\x01\x02" + bytes([len(classification)]) + classification.encode("ascii") + ctx
    provider, ref, blob = "local", "local:general:v1", det(name + " wrapped", 60)
    keys = bytes([1, len(provider)]) + provider.encode() + u16(len(ref)) + ref.encode() + u16(len(blob)) + blob
    tail = commitment + struct.pack(">I", segment_size) + prefix
    aad = header + tail
    count = max(1, -(-size // segment_size))
    aead = AESGCM(enc_key)
    sealed = []
    nonces = []
    for i in range(count):
        nonce = prefix + struct.pack(">I", i) + bytes([1 if i == count - 1 else 0])
        nonces.append(nonce.hex())
        sealed.append(aead.encrypt(nonce, plaintext[i * segment_size : (i + 1) * segment_size], aad))
    return {
        "name": name,
        "description": description,
        "dek": dek.hex(),
        "nonce_prefix": prefix.hex(),
        "segment_size": segment_size,
        "classification": classification,
        "context": context,
        "wrapped": [{"provider": provider, "key_ref": ref, "wrapped": blob.hex()}],
        "plaintext": plaintext.hex(),
        "enc_key": enc_key.hex(),
        "commitment": commitment.hex(),
        "aad": aad.hex(),
        "segments": count,
        "nonces": nonces,
        "envelope": (header + keys + tail + b"".join(sealed)).hex(),
    }


def vectors() -> list[dict[str, object]]:
    return [
        build("empty", "An empty plaintext: one segment holding only its 16-byte tag, flagged last.", 65536, 0, {}),
        build(
            "one-partial-segment",
            "1,000 bytes under the default 64 KiB segment size: one short, last segment.",
            65536,
            1000,
            {"purpose": "scan"},
        ),
        build(
            "one-full-segment",
            "Exactly one full 8 KiB segment, which is the last (no empty segment follows).",
            8192,
            8192,
            {"purpose": "scan"},
        ),
        build(
            "several-segments",
            "Three full 5,000-byte segments and a 123-byte last one.",
            5000,
            3 * 5000 + 123,
            {"doc": "report.pdf", "owner": "Zo\u00eb"},
        ),
        build(
            "exact-multiple",
            "Four full 6,000-byte segments: the last is full and flagged last.",
            6000,
            4 * 6000,
            {"doc": "dump.sql"},
        ),
        build(
            "minimum-segment-size",
            "The minimum segment size (4,096 bytes): two full segments and a 1-byte last one.",
            4096,
            2 * 4096 + 1,
            {},
        ),
    ]


def main() -> None:
    HERE.mkdir(exist_ok=True)
    for vector in vectors():
        path = HERE / f"{vector['name']}.json"
        path.write_text(json.dumps(vector, separators=(",", ":")) + "\n", encoding="ascii")
        print(f"wrote {path.relative_to(HERE.parent)} ({path.stat().st_size} bytes)", file=sys.stderr)


if __name__ == "__main__":
    main()
