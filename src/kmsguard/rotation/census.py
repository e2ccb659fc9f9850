"""The census: what stored ciphertexts depend on, read from headers alone.

Counts every value of a source by classification x key references x region set, plus
the values that are not envelopes (plaintext still waiting for ``kmsguard migrate``, or
junk), which are counted and never shown. No key service is called and nothing is
decrypted: a header names its key references in clear (see FORMAT.md).

Each census is recorded per source in ``$KMSGUARD_HOME/census.json`` (counts and key
references only), which ``kmsguard keys status`` shows and ``kmsguard keys retire``
consults when no source is named.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import json
import os
import re
import struct
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kmsguard import envelope, segments
from kmsguard.rotation.sources import Source, Value

CENSUS_FILE = "census.json"
#: Values read per round trip to the source.
SCAN_BATCH = 10_000

#: Per suite: the fixed first bytes, and the fewest bytes after the wrapped keys.
_SUITES = {
    envelope.MAGIC + bytes((envelope.VERSION, envelope.SUITE)): envelope.COMMITMENT_SIZE
    + envelope.NONCE_SIZE
    + envelope.TAG_SIZE,
    envelope.MAGIC + bytes((envelope.VERSION, segments.SUITE)): segments.TAIL_SIZE + segments.TAG_SIZE,
}
_TEXT = envelope.TEXT_PREFIX
_TEXT_BYTES = _TEXT.encode("ascii")
_U16 = struct.Struct(">H")
_CLASS_RE = re.compile(rb"[a-z0-9_-]{1,32}")
_REF_RE = re.compile(rb"[\x21-\x7e]{1,2048}")
_ARN_REGION = re.compile(r"arn:aws[a-z-]*:kms:([a-z0-9-]+):")

Group = tuple[bytes, tuple[bytes, ...]]


def skim(value: Value) -> Group | None:
    """(classification, key references) from an envelope's header, or None for anything else.

    Walks the header's length fields with bounds checks (a truncated or garbled value is
    None); the names it returns are checked once per distinct group by :func:`take`.
    """
    found = _skim(value)
    return None if found is None else found[0]


def _skim(value: Value) -> tuple[Group, int, int, int] | None:
    """:func:`skim`, the header's length in bytes through the wrapped keys, the length of
    the prefix of ``value`` (text or binary) that holds those bytes, and the fewest bytes
    its suite needs after them."""
    if type(value) is str:
        if not value.startswith(_TEXT):
            return None
        try:
            buf = base64.urlsafe_b64decode(value[4:] + "=" * (-len(value) % 4))
        except (binascii.Error, ValueError):
            return None
        found = _walk(buf)
        if found is None:
            return None
        group, header, min_tail = found
        return group, header, 4 + 4 * -(-header // 3), min_tail  # the characters that decode to those bytes
    buf = value if type(value) is bytes else bytes(value)  # type: ignore[arg-type]
    if buf[:4] == _TEXT_BYTES:
        try:
            return _skim(buf.decode("ascii"))
        except UnicodeDecodeError:
            return None
    walked = _walk(buf)
    return None if walked is None else (walked[0], walked[1], walked[1], walked[2])


def _walk(buf: bytes) -> tuple[Group, int, int] | None:
    min_tail = _SUITES.get(buf[:4])
    if min_tail is None:
        return None
    try:
        pos = 5 + buf[4]
        cls = buf[5:pos]
        (pairs,) = _U16.unpack_from(buf, pos)
        pos += 2
        for _ in range(2 * pairs):
            pos += 2 + _U16.unpack_from(buf, pos)[0]
        count = buf[pos]
        pos += 1
        if not 1 <= count <= envelope.MAX_WRAPPED_KEYS:
            return None
        refs = []
        for _ in range(count):
            pos += 1 + buf[pos]
            (size,) = _U16.unpack_from(buf, pos)
            refs.append(buf[pos + 2 : pos + 2 + size])
            pos += 2 + size
            pos += 2 + _U16.unpack_from(buf, pos)[0]
    except (IndexError, struct.error):
        return None
    if len(buf) - pos < min_tail:
        return None
    return (cls, tuple(refs)), pos, min_tail


class _Skimmer:
    """:func:`skim` with a memory of headers seen: values that share a data key share their
    header through the wrapped keys byte for byte, so after the first such value the others
    cost a prefix lookup (and a length check for the rest) instead of a walk.
    """

    #: Remembered prefixes before the memory starts over (values under distinct data keys).
    LIMIT = 4096

    def __init__(self) -> None:
        #: prefix length -> prefix -> (group, the fewest bytes an envelope with that header has)
        self._seen: dict[int, dict[Value, tuple[Group, int]]] = {}
        self._size = 0

    def __call__(self, value: Value) -> Group | None:
        for length, known in self._seen.items():
            hit = known.get(value[:length])
            if hit is not None and _size(value) >= hit[1]:
                return hit[0]
        found = _skim(value)
        if found is None:
            return None
        group, header, length, min_tail = found
        if self._size >= self.LIMIT:
            self._seen.clear()
            self._size = 0
        self._seen.setdefault(length, {})[value[:length]] = (group, header + min_tail)
        self._size += 1
        return group


def _size(value: Value) -> int:
    """The envelope's size in bytes, from a text token's length or a binary value's (-1: no
    base64 text is that long)."""
    if type(value) is str or value[:4] == _TEXT_BYTES:
        chars = len(value) - 4
        return -1 if chars % 4 == 1 else chars * 3 // 4
    return len(value)


@dataclass
class Census:
    """Counts of one source. ``groups`` maps (classification, key refs) to a count."""

    source: str
    groups: dict[tuple[str, tuple[str, ...]], int] = field(default_factory=dict)
    not_envelopes: int = 0
    at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    @property
    def total(self) -> int:
        return sum(self.groups.values()) + self.not_envelopes

    def under(self, key_ref: str) -> int:
        """How many envelopes hold a wrapped key under ``key_ref``."""
        return sum(n for (_, refs), n in self.groups.items() if key_ref in refs)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "at": self.at,
            "total": self.total,
            "envelopes": sum(self.groups.values()),
            "not_envelopes": self.not_envelopes,
            "groups": [
                {"classification": c, "keys": list(refs), "regions": regions_of(refs), "count": n}
                for (c, refs), n in sorted(self.groups.items())
            ],
        }

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> Census:
        groups = {(g["classification"], tuple(g["keys"])): int(g["count"]) for g in doc["groups"]}
        return cls(doc["source"], groups, int(doc["not_envelopes"]), doc["at"])


def regions_of(refs: Iterable[str]) -> list[str]:
    """The AWS regions of key ARNs (a local key reference has none)."""
    return sorted({m[1] for ref in refs if (m := _ARN_REGION.match(ref))})


def take(source: Source, batch: int = SCAN_BATCH) -> Census:
    """Count every value of ``source`` by its header."""
    counts: Counter[Group | None] = Counter()
    skimmer = _Skimmer()
    for chunk in source.values(batch):
        counts.update(map(skimmer, chunk))
    census = Census(source.label)
    for group, n in counts.items():
        if group is None or not _CLASS_RE.fullmatch(group[0]) or not all(_REF_RE.fullmatch(r) for r in group[1]):
            census.not_envelopes += n
            continue
        key = (group[0].decode("ascii"), tuple(r.decode("ascii") for r in group[1]))
        census.groups[key] = census.groups.get(key, 0) + n
    return census


# ---------------------------------------------------------------------- the record


def record(home: Path, census: Census) -> None:
    """Keep ``census`` as the latest of its source (read-modify-write under a file lock)."""
    path = home / CENSUS_FILE
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(home / ".census.lock", os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        doc = _read(path)
        doc[census.source] = census.to_dict()
        tmp = path.with_name(f".{CENSUS_FILE}.{os.getpid()}.tmp")
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w", encoding="utf-8") as fh:
            json.dump(doc, fh, indent=2, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        os.close(fd)


def recorded(home: Path) -> list[Census]:
    """The latest census of every source ever counted, oldest source label first."""
    return [Census.from_dict(doc) for _, doc in sorted(_read(home / CENSUS_FILE).items())]


def _read(path: Path) -> dict[str, Any]:
    with contextlib.suppress(FileNotFoundError):
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            return {}
        return doc if isinstance(doc, dict) else {}
    return {}
