"""The audit record, its canonical encoding and the per-writer hash chain.

A record says who did what to which class of data under which key, when, and how it
ended; it never holds plaintext, data keys, envelope bodies or secrets. Context values
are replaced by keyed hashes (HMAC-SHA256 under the audit key): two records about the
same customer id can be correlated, but the id cannot be read back or guessed without
the key.

Every writer (one process) numbers its records 1, 2, 3... and chains them: each record
carries the previous record's hash, and its own hash is an HMAC-SHA256, under a chain
key derived from the audit key, over the record's canonical encoding. Editing,
deleting or reordering a record breaks the chain, and because the hash is keyed, whoever
can write to the audit database but does not hold the audit key cannot re-forge it.
A writer that closes cleanly ends its chain with a ``writer-closed`` record, so cutting
off a closed chain's tail is detected too.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

#: prev_hash of a chain's first record.
GENESIS = "0" * 64
#: The record version; part of the canonical encoding so a future layout cannot be confused with this one.
RECORD_VERSION = 1
#: The operation name of the record that ends a writer's chain when it closes cleanly.
CLOSE_OPERATION = "writer-closed"

#: Column order: the canonical encoding, the sinks' columns and the JSON output all follow it.
FIELDS = (
    "writer_id",
    "seq",
    "prev_hash",
    "time",
    "operation",
    "classification",
    "key_refs",
    "regions",
    "principal",
    "outcome",
    "error_code",
    "duration_us",
    "kms_calls",
    "cache_hit",
    "size",
    "request_id",
    "context",
    "hash",
)


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One audited operation. ``context`` maps each context key to the keyed hash of its value."""

    writer_id: str
    seq: int
    prev_hash: str
    time: str
    operation: str
    classification: str | None
    key_refs: tuple[str, ...]
    regions: tuple[str, ...]
    principal: str
    outcome: str
    error_code: str | None
    duration_us: int
    kms_calls: int
    cache_hit: bool | None
    size: int
    request_id: str | None
    context: Mapping[str, str]
    hash: str

    def canonical(self) -> bytes:
        """The bytes the chain hash covers: every field but ``hash``, in FIELDS order, as compact JSON."""
        return canonical_bytes(self.as_values()[:-1])

    def as_values(self) -> tuple[Any, ...]:
        return (
            self.writer_id,
            self.seq,
            self.prev_hash,
            self.time,
            self.operation,
            self.classification,
            list(self.key_refs),
            list(self.regions),
            self.principal,
            self.outcome,
            self.error_code,
            self.duration_us,
            self.kms_calls,
            self.cache_hit,
            self.size,
            self.request_id,
            dict(sorted(self.context.items())),
            self.hash,
        )

    def to_dict(self) -> dict[str, Any]:
        return dict(zip(FIELDS, self.as_values(), strict=True))

    @classmethod
    def from_dict(cls, row: Mapping[str, Any]) -> AuditRecord:
        return cls(
            writer_id=str(row["writer_id"]),
            seq=int(row["seq"]),
            prev_hash=str(row["prev_hash"]),
            time=str(row["time"]),
            operation=str(row["operation"]),
            classification=row["classification"],
            key_refs=tuple(row["key_refs"]),
            regions=tuple(row["regions"]),
            principal=str(row["principal"]),
            outcome=str(row["outcome"]),
            error_code=row["error_code"],
            duration_us=int(row["duration_us"]),
            kms_calls=int(row["kms_calls"]),
            cache_hit=None if row["cache_hit"] is None else bool(row["cache_hit"]),
            size=int(row["size"]),
            request_id=row["request_id"],
            context=dict(row["context"]),
            hash=str(row["hash"]),
        )


_ENCODER = json.JSONEncoder(separators=(",", ":"), sort_keys=True, ensure_ascii=True, allow_nan=False)


def canonical_bytes(values: Sequence[Any]) -> bytes:
    """Compact, key-sorted, ASCII-only JSON of ``[RECORD_VERSION, *values]``: one byte string per record."""
    return _ENCODER.encode([RECORD_VERSION, *values]).encode("ascii")


def to_json(value: Any) -> str:
    """The canonical JSON text of one value (how sinks store lists and the context)."""
    return _ENCODER.encode(value)


_second = -1
_second_text = ""


def format_time(epoch: float) -> str:
    """UTC, microseconds, fixed width: sorts as text, round-trips through every sink unchanged.

    The date-and-second prefix is cached: the writer formats thousands of times a second.
    """
    global _second, _second_text
    whole = int(epoch)
    micros = round((epoch - whole) * 1e6)
    if micros >= 1_000_000:
        whole, micros = whole + 1, micros - 1_000_000
    if whole != _second:
        _second_text = datetime.fromtimestamp(whole, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        _second = whole
    return f"{_second_text}.{micros:06d}Z"


class AuditKeys:
    """The two keys derived from one 32-byte audit secret: one for context values, one for the chain.

    Deriving separate keys keeps the context hashes (which anyone reading the log sees
    next to each other) from being usable as chain MACs, and vice versa.
    """

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 32:
            raise ValueError("the audit secret must be at least 32 bytes")
        self._context_key = _derive(secret, b"kmsguard audit v1 context")
        self._chain_key = _derive(secret, b"kmsguard audit v1 chain")
        #: Names the key in verify's report (so two operators can tell they checked with the same one).
        self.fingerprint = hashlib.sha256(self._chain_key).hexdigest()[:16]
        self._memo: dict[tuple[str, str], str] = {}

    def hash_context(self, pairs: Sequence[tuple[str, str]]) -> dict[str, str]:
        """Each value replaced by HMAC-SHA256(context key, key NUL value), hex: correlatable, not reversible.

        Recent pairs are memoized: the same tenant or purpose recurs in most records.
        """
        out = {}
        memo = self._memo
        for pair in pairs:
            digest = memo.get(pair)
            if digest is None:
                if len(memo) >= 4096:
                    memo.clear()
                digest = memo[pair] = hmac.digest(self._context_key, f"{pair[0]}\x00{pair[1]}".encode(), "sha256").hex()
            out[pair[0]] = digest
        return out

    def chain_hash(self, canonical: bytes) -> str:
        return hmac.digest(self._chain_key, canonical, "sha256").hex()


def _derive(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


class Chain:
    """One writer's chain position: turns raw operation facts into linked, hashed records."""

    def __init__(self, keys: AuditKeys, writer_id: str, last_seq: int = 0, last_hash: str = GENESIS) -> None:
        self.keys = keys
        self.writer_id = writer_id
        self.last_seq = last_seq
        self.last_hash = last_hash

    def link(self, seq: int, fields: Sequence[Any]) -> list[Any]:
        """Record ``seq`` from a spooled tuple (see AuditObserver), as values in FIELDS order; advances the chain.

        ``fields`` is (time, operation, classification, key_refs, regions, principal,
        outcome, error_code, duration, kms_calls, cache_hit, size, request_id, context pairs).
        Plain lists rather than AuditRecord objects: this runs once per operation, in the
        same process (and under the same GIL) as the operations themselves.
        """
        if seq != self.last_seq + 1:
            raise ValueError(f"audit chain {self.writer_id}: expected record {self.last_seq + 1}, got {seq}")
        (t, name, cls, key_refs, regions, principal, outcome, error_code, duration, kms, cache_hit, size, rid, ctx) = (
            fields
        )
        values = [
            self.writer_id,
            seq,
            self.last_hash,
            format_time(t),
            name,
            cls,
            list(key_refs),
            list(regions),
            principal,
            outcome,
            error_code,
            round(duration * 1e6),
            kms,
            cache_hit,
            size,
            rid,
            self.keys.hash_context(ctx) if ctx else {},
        ]
        digest = self.keys.chain_hash(canonical_bytes(values))
        values.append(digest)
        self.last_seq, self.last_hash = seq, digest
        return values
