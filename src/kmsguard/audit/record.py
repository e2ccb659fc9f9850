"""The audit record: its fields (defined once, here), the stored row and the one canonical encoding.

A record says who did what to which class of data under which key, when, and how it
ended; it never holds plaintext, data keys, envelope bodies or secrets. Context values
are replaced by keyed hashes (HMAC-SHA256 under the audit key, see chain.py): two
records about the same customer id can be correlated, but the id cannot be read back or
guessed without the key.

:class:`AuditRecord` is the single definition of the fields: their order is the
canonical encoding's and the sinks' column order, and their metadata (``column``) is
what schema.py generates the SQLite and PostgreSQL tables from. A sink stores
:class:`AuditRun` rows: a record plus ``last_seq`` and ``items``. A lone record is a
run of one with no items; a stretch of cache hits of one kind is one row whose items
give each record's start, duration, size and request number. Every row is one link
of its writer's hash chain, its MAC taken over :func:`canonical` (FORMAT.md, "Audit
trail", specifies it byte by byte).

Rows written before runs existed (format 1: ``last_seq`` is NULL) are read and
verified with the same encoder at version 1.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime
from json.encoder import c_make_encoder, encode_basestring_ascii  # type: ignore[attr-defined]
from operator import attrgetter
from typing import Any, NamedTuple

from kmsguard.errors import InvalidInput

#: prev_hash of a chain's first record.
GENESIS = "0" * 64
#: The canonical encoding of a row written before runs existed (read only: last_seq NULL).
RECORD_VERSION = 1
#: The canonical encoding of every row written now: a run, of one record or many...
RUN_VERSION = 2
#: ...except a run holding records of a caller's own request id (items whose request is 0).
CALLER_ID_VERSION = 3
#: What a request id may be (a caller's own comes from outside, e.g. an HTTP header):
#: 1 to REQUEST_ID_MAX characters of this set, so it is safe in logs, headers and queries.
REQUEST_ID_MAX = 128
REQUEST_ID = re.compile(rf"[A-Za-z0-9._:/+=-]{{1,{REQUEST_ID_MAX}}}")
#: The operation name of the record that ends a writer's chain when it closes cleanly.
CLOSE_OPERATION = "writer-closed"
#: One record of a run: start (microseconds since the epoch), duration (ns), size, request number.
RUN_ITEM = struct.Struct(">4Q")
#: Records per stored run at most (4,096 x 32 bytes of items: a 128 KiB row).
MAX_RUN = 4096


class Column(NamedTuple):
    """How one field is stored: ``kind`` is one of text, int, bigint, bool, bytes (schema.py maps
    them to SQL types); ``json`` fields are stored as canonical JSON text; ``since`` is the first
    row format that has the column (a table from before it gets it added)."""

    name: str
    kind: str
    null: bool
    json: bool
    since: int


def column(kind: str, *, null: bool = False, json: bool = False, since: int = RECORD_VERSION) -> Any:
    """A dataclass field that is a stored column (see :class:`Column`)."""
    return field(metadata={"column": (kind, null, json, since)})


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One audited operation. ``context`` maps each context key to the keyed hash of its value."""

    writer_id: str = column("text")
    seq: int = column("bigint")
    prev_hash: str = column("text")
    time: str = column("text")
    operation: str = column("text")
    classification: str | None = column("text", null=True)
    key_refs: tuple[str, ...] = column("text", json=True)
    regions: tuple[str, ...] = column("text", json=True)
    principal: str = column("text")
    outcome: str = column("text")
    error_code: str | None = column("text", null=True)
    duration_us: int = column("bigint")
    kms_calls: int = column("int")
    cache_hit: bool | None = column("bool", null=True)
    size: int = column("bigint")
    #: The request the operation served: kmsguard's own id (``<process prefix><10 hex digits>``)
    #: or a caller's (check_request_id); None for a writer's own records.
    request_id: str | None = column("text", null=True)
    context: Mapping[str, str] = column("text", json=True)
    #: The chain MAC of the row this record is stored in (a run's records share it).
    hash: str = column("text")
    #: The stored row this record was read from, if it came from a sink.
    run: AuditRun | None = field(default=None, compare=False, repr=False)

    def signed_json(self) -> str:
        """The fields a row's MAC covers (all but ``hash``), as :func:`signed_json` gives them."""
        return signed_json(_SIGNED_GETTER(self))

    def canonical(self) -> bytes:
        """The bytes a format-1 row's MAC covers (rows written before runs existed)."""
        return canonical(self.signed_json())

    def renumbered(self, seq: int) -> AuditRecord:
        """The same record claiming another sequence number (verify's search for a moved record)."""
        return replace(self, seq=seq)

    def to_dict(self) -> dict[str, Any]:
        """The stored fields by name (lists as lists, the context sorted), as JSON output shows them."""
        out = {name: getattr(self, name) for name in RECORD_COLUMNS}
        out["key_refs"], out["regions"] = list(self.key_refs), list(self.regions)
        out["context"] = dict(sorted(self.context.items()))
        return out

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


class Item(NamedTuple):
    """One record of a run, as RUN_ITEM packs it."""

    started_us: int
    duration_ns: int
    size: int
    request: int


@dataclass(frozen=True, slots=True)
class AuditRun:
    """One stored row: records ``head.seq`` to ``last_seq`` of one writer, all of one shape.

    A lone record is a run of one with empty ``items``: ``head`` is the record. A run of
    cache hits (the deliverer packs consecutive hit frames of one template this way) has
    one RUN_ITEM per record, in sequence order, and ``head`` holds the shape's fields,
    the first record's duration, size and request id, and as ``time`` the latest start in
    the run (so that ordering rows by time finds the newest records). The row's chain MAC
    (``head.hash``) covers :meth:`canonical`.
    """

    head: AuditRecord
    last_seq: int = column("bigint", null=True, since=RUN_VERSION)
    items: bytes = column("bytes", null=True, since=RUN_VERSION)

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
        return canonical(self.head.signed_json(), self.last_seq, self.items)

    def renumbered(self, seq: int) -> AuditRun:
        """The same row claiming another first sequence number (a lone record's last is its first)."""
        last_seq = seq + self.last_seq - self.head.seq if self.items else seq
        return replace(self, head=replace(self.head, seq=seq), last_seq=last_seq)

    def records(self) -> list[AuditRecord]:
        """One AuditRecord per operation: the head alone for a lone record (no items). Items that
        do not fit the run's numbers (the row was tampered with) also give the head alone,
        which verify then reports as altered."""
        head, items = self.head, self.items
        count = self.last_seq - head.seq + 1
        if count < 1 or len(items) != count * RUN_ITEM.size:
            return [replace(head, run=self)]
        listed = [Item._make(i) for i in RUN_ITEM.iter_unpack(items)]
        # The head's id is the first record's: the prefix, and its number unless that is 0.
        first_number = f"{listed[0].request:010x}" if listed[0].request else ""
        prefix = (head.request_id or "").removesuffix(first_number)
        ids = [f"{prefix}{item.request:010x}" if item.request else prefix for item in listed]
        try:
            return [
                replace(
                    head,
                    seq=head.seq + i,
                    time=format_time_us(item.started_us),
                    duration_us=duration_us(item.duration_ns),
                    size=item.size,
                    request_id=request_id,
                    run=self,
                )
                for i, (item, request_id) in enumerate(zip(listed, ids, strict=True))
            ]
        except (ValueError, OverflowError, OSError):  # a start no calendar holds: tampered with
            return [replace(head, run=self)]


def check_request_id(text: str) -> str:
    """``text`` if it may be a record's request id (REQUEST_ID), else InvalidInput (which does not repeat it)."""
    if not isinstance(text, str) or not REQUEST_ID.fullmatch(text):
        raise InvalidInput(f"a request id is 1 to {REQUEST_ID_MAX} characters of A-Z a-z 0-9 . _ : / + = -")
    return text


def _has_caller_ids(items: bytes) -> bool:
    """A run with an item whose request is 0, a record carrying a caller's id, the prefix alone (format 3)."""
    if not items or len(items) % RUN_ITEM.size:
        return False
    return 0 in memoryview(items).cast("Q")[3::4]  # each item's request (0 in either byte order)


def _columns() -> tuple[Column, ...]:
    out = []
    for f in (*fields(AuditRecord), *fields(AuditRun)):
        if "column" in f.metadata:
            out.append(Column(f.name, *f.metadata["column"]))
    return tuple(out)


#: Every stored column, in order: the record's fields, then the run's.
SCHEMA: tuple[Column, ...] = _columns()
COLUMNS = tuple(c.name for c in SCHEMA)
#: The record's stored fields (COLUMNS without the run's).
RECORD_COLUMNS = tuple(c.name for c in SCHEMA if c.since == RECORD_VERSION)
#: The fields a row's MAC covers, in order (every record field but its hash).
SIGNED = RECORD_COLUMNS[:-1]
assert RECORD_COLUMNS[-1] == "hash"


_ENCODER = json.JSONEncoder(separators=(",", ":"), sort_keys=True, ensure_ascii=True, allow_nan=False)


def _unencodable(value: Any) -> Any:
    raise TypeError(f"{type(value).__name__} is not in an audit record")


# _ENCODER's C core, called without the per-call setup of JSONEncoder.encode (the
# deliverer encodes tens of thousands of records a second); the same bytes.
_c_encode = c_make_encoder and c_make_encoder(None, _unencodable, encode_basestring_ascii, None, ":", ",", True,
                                              False, False)


def to_json(value: Any) -> str:
    """The canonical JSON text of one value: compact, keys sorted, ASCII only (tuples as arrays)."""
    if _c_encode is None or type(value) is str:
        return _ENCODER.encode(value)
    return "".join(_c_encode(value, 0))


def signed_json(values: Sequence[Any]) -> str:
    """The SIGNED fields' values, in that order, as the inside of a canonical JSON array."""
    return to_json(values)[1:-1]


def canonical(signed: str, last_seq: int | None = None, items: bytes = b"") -> bytes:
    """The bytes a row's chain MAC covers: the one encoder of writer, deliverer and verify.

    ``signed`` is :func:`signed_json` of the row's record fields, so the JSON part is the
    canonical JSON of the array ``[version, *fields, last_seq]``::

        version 3 (a run with a caller's request ids):    [3,<fields>,<last_seq>] LF <items>
        version 2 (every other row written now):          [2,<fields>,<last_seq>] LF <items>
        version 1 (last_seq None; read only):             [1,<fields>]

    The version follows from the items (see AuditRun.records), so it needs no column.
    """
    if last_seq is None:
        return f"[{RECORD_VERSION},{signed}]".encode("ascii")
    version = CALLER_ID_VERSION if _has_caller_ids(items) else RUN_VERSION
    return f"[{version},{signed},{last_seq}]\n".encode("ascii") + items


def duration_us(duration_ns: int) -> int:
    """An item's duration as the record's field (kept as runs have always computed it)."""
    return round(duration_ns / 1e9 * 1e6)


#: The last second formatted and its text, replaced as one tuple (so threads never see a mix).
_last_second: tuple[int, str] = (-1, "")


def format_time(epoch: float) -> str:
    """UTC, microseconds, fixed width: sorts as text, round-trips through every sink unchanged."""
    return format_time_us(round(epoch * 1e6))


def format_time_us(epoch_us: int) -> str:
    """:func:`format_time` of microseconds since the epoch.

    The date-and-second prefix is cached: the deliverer formats many thousands a second.
    """
    global _last_second
    whole, micros = divmod(epoch_us, 1_000_000)
    second, text = _last_second
    if whole != second:
        text = datetime.fromtimestamp(whole, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        _last_second = (whole, text)
    return f"{text}.{micros:06d}Z"


def row_values(run: AuditRun) -> tuple[Any, ...]:
    """The row's column values (COLUMNS order) for the SQL sinks: JSON fields as canonical JSON text."""
    head = run.head
    values = list(_RECORD_GETTER(head))
    for at in _JSON_AT:
        values[at] = _json_text(values[at])
    return (*values, run.last_seq, run.items)


_RECORD_GETTER = attrgetter(*RECORD_COLUMNS)
_SIGNED_GETTER = attrgetter(*SIGNED)
_JSON_AT = tuple(i for i, c in enumerate(SCHEMA) if c.json)
_JSON_CACHE: dict[Any, str] = {}


def _json_text(value: Any) -> str:
    """Key references, regions and hashed contexts repeat in nearly every record: encode each once."""
    key = (dict, tuple(value.items())) if isinstance(value, Mapping) else (tuple, tuple(value))
    text = _JSON_CACHE.get(key)
    if text is None:
        if len(_JSON_CACHE) >= 4096:
            _JSON_CACHE.clear()
        text = _JSON_CACHE[key] = to_json(value)
    return text


def records_from_row(values: Sequence[Any]) -> list[AuditRecord]:
    """The records a stored row holds (COLUMNS order, JSON fields as text), run or lone record."""
    d = dict(zip(COLUMNS, values, strict=True))
    for c in SCHEMA:
        if c.json:
            d[c.name] = json.loads(d[c.name])
    return records_from_columns(d)


def records_from_columns(d: Mapping[str, Any]) -> list[AuditRecord]:
    """The records of a row given by column name (a format-1 row has no ``last_seq``)."""
    record = AuditRecord.from_dict(d)
    if d.get("last_seq") is None:
        return [record]
    return AuditRun(record, int(d["last_seq"]), bytes(d["items"] or b"")).records()
