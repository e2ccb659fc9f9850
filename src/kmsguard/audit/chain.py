"""The per-writer hash chain: audit keys, and the linking of spooled facts into stored rows.

Every writer (one process) numbers its records 1, 2, 3... and chains its rows: each
row carries the previous row's hash, and its own hash is an HMAC-SHA256, under a chain
key derived from the audit key, over the row's canonical encoding (record.canonical).
Editing, deleting or reordering a row breaks the chain, and because the hash is keyed,
whoever can write to the audit database but does not hold the audit key cannot
re-forge it. A writer that closes cleanly ends its chain with a ``writer-closed``
record, so cutting off a closed chain's tail is detected too.

A row is a run (record.AuditRun): one record spooled in full, or a stretch of hit
frames of one template. Both are linked by :meth:`Chain.link`, one path.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from operator import itemgetter
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from kmsguard.audit.facts import Hits, Spooled
from kmsguard.audit.record import (
    GENESIS,
    SIGNED,
    AuditRecord,
    AuditRun,
    canonical,
    duration_us,
    format_time,
    format_time_us,
    signed_json,
)
from kmsguard.errors import ConfigurationError


class OutOfSequence(Exception):
    """A chain was asked to link a record that does not follow its last one (a deliverer bug)."""


class AuditKeys:
    """The two keys derived from one 32-byte audit secret: one for context values, one for the chain.

    Deriving separate keys keeps the context hashes (which anyone reading the log sees
    next to each other) from being usable as chain MACs, and vice versa.
    """

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 32:
            raise ConfigurationError("the audit secret must be at least 32 bytes")
        self._context_key = _derive(secret, b"kmsguard audit v1 context")
        chain_key = _derive(secret, b"kmsguard audit v1 chain")
        # Keyed once; each row's MAC starts from a copy of it.
        self._chain_mac = hmac.new(chain_key, digestmod="sha256")
        #: Names the key in verify's report (so two operators can tell they checked with the same one).
        self.fingerprint = hashlib.sha256(chain_key).hexdigest()[:16]
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
        mac = self._chain_mac.copy()
        mac.update(canonical)
        return mac.hexdigest()


def _derive(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


_SIGNED_OF = itemgetter(*SIGNED)


class Chain:
    """One writer's chain position: turns spooled facts into linked, hashed rows."""

    def __init__(self, keys: AuditKeys, writer_id: str, last_seq: int = 0, last_hash: str = GENESIS) -> None:
        self.keys = keys
        self.writer_id = writer_id
        self.last_seq = last_seq
        self.last_hash = last_hash

    def link(self, seq: int, entry: Spooled | Hits) -> AuditRun:
        """The row of record ``seq`` (Spooled) or of records ``seq`` onwards (Hits); advances the chain."""
        if seq != self.last_seq + 1:
            raise OutOfSequence(f"audit chain {self.writer_id}: expected record {self.last_seq + 1}, got {seq}")
        if isinstance(entry, Hits):
            return self._seal(self._hits_fields(seq, entry), seq + len(entry) - 1, entry.items)
        return self._seal(self._record_fields(seq, entry), seq, b"")

    def _record_fields(self, seq: int, s: Spooled) -> dict[str, Any]:
        return {
            "writer_id": self.writer_id,
            "seq": seq,
            "prev_hash": self.last_hash,
            "time": format_time(s.time),
            "operation": s.operation,
            "classification": s.classification,
            "key_refs": tuple(s.key_refs),
            "regions": tuple(s.regions),
            "principal": s.principal,
            "outcome": s.outcome,
            "error_code": s.error_code,
            "duration_us": round(s.duration * 1e6),
            "kms_calls": s.kms_calls,
            "cache_hit": s.cache_hit,
            "size": s.size,
            "request_id": s.request_id,
            "context": self.keys.hash_context(s.context) if s.context else {},
        }

    def _hits_fields(self, seq: int, hits: Hits) -> dict[str, Any]:
        """The head of a run: the shape's fields, the first hit's duration, size and request id,
        and the latest start (see record.AuditRun)."""
        shape, first = hits.template.shape, hits.first()
        return {
            "writer_id": self.writer_id,
            "seq": seq,
            "prev_hash": self.last_hash,
            "time": format_time_us(hits.latest),
            "operation": shape.operation,
            "classification": shape.classification,
            "key_refs": shape.key_refs,
            "regions": shape.regions,
            "principal": shape.principal,
            "outcome": shape.outcome,
            "error_code": shape.error_code,
            "duration_us": duration_us(first.duration_ns),
            "kms_calls": shape.kms_calls,
            "cache_hit": shape.cache_hit,
            "size": first.size,
            "request_id": hits.template.request_id(first.request),
            "context": hits.template.hashed_context(self.keys),
        }

    def _seal(self, fields: dict[str, Any], last_seq: int, items: bytes) -> AuditRun:
        digest = self.keys.chain_hash(canonical(signed_json(_SIGNED_OF(fields)), last_seq, items))
        self.last_seq, self.last_hash = last_seq, digest
        return AuditRun(AuditRecord(**fields, hash=digest), last_seq, items)
