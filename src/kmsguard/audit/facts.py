"""What the spool holds for a record before the deliverer chains it.

The caller's thread spools facts, not records: no MAC, no hashed context, no JSON. A
non-strict operation of a kind seen before is a hit frame naming a :class:`Template`
(frames.py); anything else is a :class:`Spooled` tuple. The spool reader gives back
Spooled tuples and, for hit frames, :class:`Hits`: consecutive hits of one template as
one run. FORMAT.md ("Audit trail") specifies the frames that carry them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, NamedTuple

from kmsguard.audit.record import RUN_ITEM, Item

if TYPE_CHECKING:
    from kmsguard.audit.chain import AuditKeys


class Shape(NamedTuple):
    """What every operation of one kind shares: kmsguard.operation.EventKind.shape, by name.

    Hashes and compares as the plain tuple EventKind.shape is, so either keys the
    audit writer's templates.
    """

    operation: str
    classification: str | None
    key_refs: tuple[str, ...]
    regions: tuple[str, ...]
    principal: str
    outcome: str
    error_code: str | None
    kms_calls: int
    cache_hit: bool | None
    context: tuple[tuple[str, str], ...]


class Spooled(NamedTuple):
    """One record's facts as a record frame holds them (after its sequence number).

    ``time`` is the start (seconds since the epoch), ``duration`` seconds, ``context``
    the operation's context pairs in clear (the deliverer hashes them). The order is the
    record frame's on disk (FORMAT.md), which is why it repeats Shape's fields in among
    its own instead of holding a Shape.
    """

    time: float
    operation: str
    classification: str | None
    key_refs: tuple[str, ...]
    regions: tuple[str, ...]
    principal: str
    outcome: str
    error_code: str | None
    duration: float
    kms_calls: int
    cache_hit: bool | None
    size: int
    request_id: str | None
    context: tuple[tuple[str, str], ...]

    @classmethod
    def of(cls, shape: tuple[object, ...], started: float, duration: float, size: int,
           request_id: str | None) -> Spooled:
        """The facts of one operation of ``shape`` (an EventKind.shape tuple)."""
        return cls(time=started, duration=duration, size=size, request_id=request_id, **Shape._make(shape)._asdict())


class Template:
    """A template frame: the Shape that hit frames name, and their request ids' prefix: a hit's
    id is the prefix and its request number as 10 hex digits, or (request 0) the prefix
    alone, a caller's own request id.

    The context's keyed hash is worked out once per audit key: every record of the
    template shares it.
    """

    __slots__ = ("_context", "_keys", "prefix", "shape")

    def __init__(self, shape: tuple[object, ...], prefix: str) -> None:
        self.shape = Shape._make(shape)
        self.prefix = prefix
        self._keys: AuditKeys | None = None
        self._context: Mapping[str, str] = {}

    def request_id(self, request: int) -> str:
        """The request id of a hit with request number ``request``."""
        return f"{self.prefix}{request:010x}" if request else self.prefix

    def hashed_context(self, keys: AuditKeys) -> Mapping[str, str]:
        if self._keys is not keys:
            self._context = keys.hash_context(self.shape.context) if self.shape.context else {}
            self._keys = keys
        return self._context


class Hits:
    """Consecutive hit frames of one Template, as a run's items (RUN_ITEM each) and their latest start.

    What the spool reader takes in one piece (kmsguard.audit.frames.take_hits) and the
    chain links as one run (one stored row).
    """

    __slots__ = ("items", "latest", "template")

    def __init__(self, template: Template, items: bytes, latest: int) -> None:
        self.template = template
        self.items = items
        self.latest = latest

    def __len__(self) -> int:
        return len(self.items) // RUN_ITEM.size

    def first(self) -> Item:
        return Item._make(RUN_ITEM.unpack_from(self.items))

    def after(self, skipped: int) -> Hits:
        """The same run without its first ``skipped`` records (the sink holds them already)."""
        items = self.items[skipped * RUN_ITEM.size :]
        return Hits(self.template, items, max(Item._make(i).started_us for i in RUN_ITEM.iter_unpack(items)))
