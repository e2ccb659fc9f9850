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
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
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
#: The version of a run's canonical encoding (see AuditRun).
RUN_VERSION = 2
#: What the sinks store per row: a record's FIELDS, then, for a run, its last sequence number and items.
COLUMNS = (*FIELDS, "last_seq", "items")
#: One record of a run: start (microseconds since the epoch), duration (ns), size, request number.
RUN_ITEM = struct.Struct(">4Q")
#: Records per stored run at most (4,096 x 32 bytes of items: a 128 KiB row).
MAX_RUN = 4096


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
    #: The stored run this record was expanded from (its hash and prev_hash are the run's), if any.
    run: AuditRun | None = None

    def canonical(self) -> bytes:
        """The bytes the chain hash covers: every field but ``hash``, in FIELDS order, as compact JSON."""
        return canonical_bytes(self.as_values()[:-1])

    def renumbered(self, seq: int) -> AuditRecord:
        """The same record claiming another sequence number (verify's search for a moved record)."""
        return replace(self, seq=seq)

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


@dataclass(frozen=True, slots=True)
class AuditRun:
    """Records ``head.seq`` to ``last_seq`` of one writer, all of one shape, stored as one row.

    The deliverer stores a stretch of consecutive hit frames of one template (operations
    that differ only in start, duration, size and request number) this way: one row,
    one chain link, instead of a row and a MAC per operation. ``head`` holds the row's
    columns: the shape's fields, the first record's duration, size and request id, and as
    ``time`` the latest start in the run (so that ordering rows by time finds the newest
    records). ``items`` is ``RUN_ITEM`` per record, in sequence order. The chain hash
    covers :meth:`canonical`::

        canonical JSON of [RUN_VERSION, <FIELDS but hash, as in a record>, last_seq] | LF | items
    """

    head: AuditRecord
    last_seq: int
    items: bytes

    @property
    def seq(self) -> int:
        return self.head.seq

    @property
    def hash(self) -> str:
        return self.head.hash

    @property
    def prev_hash(self) -> str:
        return self.head.prev_hash

    def canonical(self) -> bytes:
        return run_canonical(self.head.as_values()[:-1], self.last_seq, self.items)

    def renumbered(self, seq: int) -> AuditRun:
        return replace(self, head=replace(self.head, seq=seq), last_seq=seq + self.last_seq - self.head.seq)

    def records(self) -> list[AuditRecord]:
        """One AuditRecord per operation. Items that do not fit the run's numbers (the row
        was tampered with) give the head alone, which verify then reports as altered."""
        head, items = self.head, self.items
        count = self.last_seq - head.seq + 1
        if count < 1 or len(items) != count * RUN_ITEM.size:
            return [replace(head, run=self)]
        first_number = f"{RUN_ITEM.unpack_from(items)[3]:010x}"
        prefix = (head.request_id or "").removesuffix(first_number)  # the head's id is the first record's
        try:
            return [
                replace(
                    head,
                    seq=head.seq + i,
                    time=format_time_us(started),
                    duration_us=round(duration / 1e9 * 1e6),
                    size=size,
                    request_id=f"{prefix}{request:010x}",
                    run=self,
                )
                for i, (started, duration, size, request) in enumerate(RUN_ITEM.iter_unpack(items))
            ]
        except (ValueError, OverflowError, OSError):  # a start no calendar holds: tampered with
            return [replace(head, run=self)]


def run_canonical(values: Sequence[Any], last_seq: int, items: bytes) -> bytes:
    """The bytes a run's chain hash covers (see AuditRun); ``values`` are its row's FIELDS but hash."""
    return _ENCODER.encode([RUN_VERSION, *values, last_seq]).encode("ascii") + b"\n" + items


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
    """UTC, microseconds, fixed width: sorts as text, round-trips through every sink unchanged."""
    return format_time_us(round(epoch * 1e6))


def format_time_us(epoch_us: int) -> str:
    """:func:`format_time` of microseconds since the epoch.

    The date-and-second prefix is cached: the deliverer formats many thousands a second.
    """
    global _second, _second_text
    whole, micros = divmod(epoch_us, 1_000_000)
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
        chain_key = _derive(secret, b"kmsguard audit v1 chain")
        # Keyed once; each record's MAC starts from a copy (~0.6 us less than hmac.digest).
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


class Template:
    """What every record of one shape shares (kmsguard.audit.frames), encoded once per audit key.

    ``shape`` is kmsguard.operation.Operation.shape(); request ids are ``prefix`` and a
    number. :meth:`pieces` holds the shape as canonical JSON fragments, with its context
    already hashed, so the chain links a :class:`Compact` record by pasting its few
    varying fields between them instead of encoding the whole record.
    """

    __slots__ = ("_keys", "_pieces", "prefix", "shape")

    def __init__(self, shape: tuple[Any, ...], prefix: str) -> None:
        self.shape = shape
        self.prefix = prefix
        self._keys: AuditKeys | None = None
        self._pieces: tuple[Any, ...] = ()

    def pieces(self, keys: AuditKeys) -> tuple[Any, ...]:
        """(JSON from operation through error_code, JSON of kms_calls and cache_hit, JSON opening the
        request id, JSON of the context, the shape's values in FIELDS order, the hashed context)."""
        if self._keys is not keys:
            name, cls, key_refs, regions, principal, outcome, error_code, kms_calls, cache_hit, ctx = self.shape
            context = keys.hash_context(ctx) if ctx else {}
            values = [name, cls, list(key_refs), list(regions), principal, outcome, error_code]
            self._pieces = (
                to_json(values)[1:-1],
                to_json([kms_calls, cache_hit])[1:-1],
                to_json(self.prefix)[:-1],  # the hex request number needs no escaping
                to_json(context),
                values,
                context,
            )
            self._keys = keys
        return self._pieces


class Compact:
    """A record spooled as a hit frame: its Template and what differs from one operation to the next."""

    __slots__ = ("duration_ns", "request", "size", "started_us", "template")

    def __init__(self, template: Template, started_us: int, duration_ns: int, size: int, request: int) -> None:
        self.template = template
        self.started_us = started_us
        self.duration_ns = duration_ns
        self.size = size
        self.request = request

    def fields(self) -> tuple[Any, ...]:
        """The same record as the spooled tuple that :meth:`Chain.link` also takes."""
        t = self.template
        return record_fields(
            t.shape, self.started_us / 1e6, self.duration_ns / 1e9, self.size, f"{t.prefix}{self.request:010x}"
        )


class Hits:
    """Consecutive hit frames of one Template, as a run's items (RUN_ITEM each) and their latest start.

    What the spool reader takes in one piece (kmsguard.audit.frames.take_hits) and the
    chain links as one run (:meth:`Chain.link_run`).
    """

    __slots__ = ("items", "latest", "template")

    def __init__(self, template: Template, items: bytes, latest: int) -> None:
        self.template = template
        self.items = items
        self.latest = latest

    def __len__(self) -> int:
        return len(self.items) // RUN_ITEM.size

    def after(self, skipped: int) -> Hits:
        """The same run without its first ``skipped`` records (the sink holds them already)."""
        items = self.items[skipped * RUN_ITEM.size :]
        return Hits(self.template, items, max(item[0] for item in RUN_ITEM.iter_unpack(items)))


def record_fields(
    shape: tuple[Any, ...], started: float, duration: float, size: int, request_id: str
) -> tuple[Any, ...]:
    """A record's fields in the order the audit writer spools them, from its shape
    (kmsguard.operation.Operation.shape) and what differs from one operation to the next."""
    name, classification, key_refs, regions, principal, outcome, error_code, kms_calls, cache_hit, context = shape
    return (started, name, classification, key_refs, regions, principal, outcome, error_code, duration, kms_calls,
            cache_hit, size, request_id, context)


_HEX_HASH = re.compile(r"[0-9a-f]{64}")


class Chain:
    """One writer's chain position: turns raw operation facts into linked, hashed records."""

    def __init__(self, keys: AuditKeys, writer_id: str, last_seq: int = 0, last_hash: str = GENESIS) -> None:
        self.keys = keys
        self.writer_id = writer_id
        self.last_seq = last_seq
        self.last_hash = last_hash
        self._writer_json = to_json(writer_id)
        self._hex_head = bool(_HEX_HASH.fullmatch(last_hash))  # may be pasted into JSON as is

    def link(self, seq: int, fields: Sequence[Any] | Compact) -> list[Any]:
        """Record ``seq`` from a spooled tuple (see AuditObserver), as values in FIELDS order; advances the chain.

        ``fields`` is (time, operation, classification, key_refs, regions, principal,
        outcome, error_code, duration, kms_calls, cache_hit, size, request_id, context pairs),
        or a Compact record. Plain lists rather than AuditRecord objects: the deliverer
        links tens of thousands a second. Records of one Template share its lists and
        context dict (nothing downstream changes them).
        """
        if seq != self.last_seq + 1:
            raise ValueError(f"audit chain {self.writer_id}: expected record {self.last_seq + 1}, got {seq}")
        if type(fields) is Compact:
            if self._hex_head:
                return self._link_compact(seq, fields)
            fields = fields.fields()  # after a head from the sink that is not one of our hashes
        assert not isinstance(fields, Compact)
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
        self.last_seq, self.last_hash, self._hex_head = seq, digest, True
        return values

    def _link_compact(self, seq: int, c: Compact) -> list[Any]:
        """:meth:`link` of a Compact record: byte for byte the same canonical encoding, from its Template's pieces."""
        head, flags, rid_open, context_json, values, context = c.template.pieces(self.keys)
        time_text = format_time_us(c.started_us)
        duration_us = round(c.duration_ns / 1e9 * 1e6)
        number = f"{c.request:010x}"
        canonical = (
            f'[{RECORD_VERSION},{self._writer_json},{seq},"{self.last_hash}","{time_text}",{head},{duration_us},'
            f'{flags},{c.size},{rid_open}{number}",{context_json}]'
        )
        digest = self.keys.chain_hash(canonical.encode("ascii"))
        kms_calls, cache_hit = c.template.shape[7:9]
        record = [self.writer_id, seq, self.last_hash, time_text, *values, duration_us, kms_calls, cache_hit, c.size,
                  c.template.prefix + number, context, digest]
        self.last_seq, self.last_hash = seq, digest
        return record

    def link_run(self, seq: int, run: Hits) -> list[Any]:
        """Records ``seq`` onwards, hits of one Template, as one stored run (see AuditRun).

        Returns the row's values in COLUMNS order; advances the chain past the whole run.
        """
        if seq != self.last_seq + 1:
            raise ValueError(f"audit chain {self.writer_id}: expected record {self.last_seq + 1}, got {seq}")
        template = run.template
        values, context = template.pieces(self.keys)[4:]
        kms_calls, cache_hit = template.shape[7:9]
        _started, duration, size, request = RUN_ITEM.unpack_from(run.items)
        row = [
            self.writer_id,
            seq,
            self.last_hash,
            format_time_us(run.latest),
            *values,
            round(duration / 1e9 * 1e6),
            kms_calls,
            cache_hit,
            size,
            f"{template.prefix}{request:010x}",
            context,
        ]
        last_seq = seq + len(run) - 1
        digest = self.keys.chain_hash(run_canonical(row, last_seq, run.items))
        self.last_seq, self.last_hash, self._hex_head = last_seq, digest, True
        return [*row, digest, last_seq, run.items]
