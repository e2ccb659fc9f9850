"""What happened during one Guard operation, gathered for audit and metrics.

Guard opens an :class:`Operation` around every encrypt, decrypt and rewrap, and makes it
the *current* operation (a context variable, so threads and batch workers each see
their own). Keyrings deep in the stack report into it with :func:`note_kms_call` and
:func:`note_cache` without knowing who listens; observers (the audit writer, the
metrics registry) receive the finished record. With no observers, Guard skips all of it
and these calls are a context-variable read.

An Operation carries names, counts and the context (which is never secret, see
DESIGN.md); never plaintext, ciphertext bodies or keys.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Protocol


@dataclass
class Operation:
    """One operation's record. Mutable while it runs; observers get it once, finished."""

    name: str
    classification: str | None
    context: Mapping[str, str]
    principal: str
    strict_audit: bool = False
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    started_at: float = field(default_factory=time.time)
    key_refs: list[str] = field(default_factory=list)
    regions: list[str] = field(default_factory=list)
    kms_calls: int = 0
    cache_hit: bool | None = None
    outcome: str = "pending"
    error_code: str | None = None
    duration: float = 0.0
    size: int = 0
    _t0: float = field(default_factory=time.perf_counter, repr=False)

    def finish(self, error: BaseException | None) -> None:
        self.duration = time.perf_counter() - self._t0
        if error is None:
            self.outcome = "ok"
        else:
            self.outcome = "error"
            self.error_code = getattr(error, "code", "INTERNAL_ERROR")


class Observer(Protocol):
    """Receives every finished operation. Must not block the caller, unless strict.

    For an operation with ``strict_audit`` set, an observer that cannot make its record
    durable raises ``AuditUnavailable`` and Guard refuses the operation.
    """

    def operation_finished(self, op: Operation) -> None: ...


current: ContextVar[Operation | None] = ContextVar("kmsguard_operation", default=None)

#: The monotonic time by which the current keyring operation must end, across every
#: region and retry. The multi-region keyring sets it; the AWS client factory bounds
#: each call by it, so failing over never outlives the caller's deadline.
deadline: ContextVar[float | None] = ContextVar("kmsguard_operation_deadline", default=None)


def note_kms_call(key_ref: str | None = None, region: str | None = None) -> None:
    """A keyring called its key service once (retries are counted by the AWS layer)."""
    op = current.get()
    if op is not None:
        op.kms_calls += 1
        if key_ref and key_ref not in op.key_refs:
            op.key_refs.append(key_ref)
        if region and region not in op.regions:
            op.regions.append(region)


def note_cache(hit: bool) -> None:
    """A caching keyring served (hit) or missed this operation's data key."""
    op = current.get()
    if op is not None:
        op.cache_hit = hit if op.cache_hit is None else op.cache_hit and hit
