"""The result of a self-test or smoke run: one :class:`Result` per check (and subject), and the verdict.

Both ``kmsguard selftest`` and ``kmsguard smoke`` report in this shape, so a table, the
JSON document (``schema.json`` in this package) and the exit code mean the same thing
for both. A result's ``detail`` is one line for a person; it names settings, keys,
regions and error codes, never plaintext, data keys, tokens or secrets (the checks
build it from those parts only).

The verdict: a run *fails* when a critical check failed; with ``strict`` it also fails
when anything warned or failed. Exit code 0 when it passes, 1 when it fails.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Literal

Status = Literal["pass", "warn", "fail", "skip"]
STATUSES: tuple[Status, ...] = ("pass", "warn", "fail", "skip")
_WORST_FIRST: tuple[Status, ...] = ("fail", "warn", "pass", "skip")
#: The version of the JSON document (``schema.json``); bumped on an incompatible change.
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Result:
    """One check's outcome, for one subject (a classification, a region, an endpoint) or for the whole run.

    ``skip`` always has a reason in ``detail``. ``duration_ms`` is the check's own time.
    """

    id: str
    title: str
    critical: bool
    status: Status
    detail: str
    subject: str | None = None
    duration_ms: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "title": self.title,
            "subject": self.subject,
            "critical": self.critical,
            "status": self.status,
            "duration_ms": round(self.duration_ms, 3),
            "detail": self.detail,
        }


@dataclass
class Report:
    """The results of one run, in the order the checks ran; ``kind`` is ``selftest`` or ``smoke``."""

    kind: str
    strict: bool = False
    results: list[Result] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)
    started_at: float = field(default_factory=time.time)
    duration_ms: float = 0.0

    def add(self, result: Result) -> Result:
        self.results.append(result)
        return result

    def status_of(self, check_id: str) -> Status | None:
        """The worst status among ``check_id``'s results (fail > warn > pass > skip), None when it did not run."""
        found = {r.status for r in self.results if r.id == check_id}
        return next((status for status in _WORST_FIRST if status in found), None)

    @property
    def critical_failures(self) -> list[Result]:
        return [r for r in self.results if r.critical and r.status == "fail"]

    @property
    def ok(self) -> bool:
        """No critical check failed; with ``strict``, nothing warned or failed either."""
        if self.critical_failures:
            return False
        return not (self.strict and any(r.status in ("warn", "fail") for r in self.results))

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1

    def ordered(self) -> list[Result]:
        """The critical results first, each group in run order (what the table shows)."""
        return [r for r in self.results if r.critical] + [r for r in self.results if not r.critical]

    def counts(self) -> dict[str, int]:
        return {status: sum(r.status == status for r in self.results) for status in STATUSES}

    def to_dict(self) -> dict[str, Any]:
        """The JSON document that ``schema.json`` describes."""
        return {
            "schema_version": SCHEMA_VERSION,
            "kind": self.kind,
            "ok": self.ok,
            "strict": self.strict,
            "exit_code": self.exit_code,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started_at)),
            "duration_ms": round(self.duration_ms, 3),
            "facts": dict(self.facts),
            "counts": self.counts(),
            "checks": [r.to_dict() for r in self.ordered()],
        }


class Timer:
    """Measures one check from its creation: ``timer.stop()`` gives (and keeps) the milliseconds so far."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.ms = 0.0

    def stop(self) -> float:
        self.ms = (time.perf_counter() - self.start) * 1000.0
        return self.ms


def schema() -> dict[str, Any]:
    """The JSON Schema of :meth:`Report.to_dict` (shipped in the package as ``schema.json``)."""
    import json

    text = resources.files("kmsguard.selftest").joinpath("schema.json").read_text(encoding="utf-8")
    doc: dict[str, Any] = json.loads(text)
    return doc


def percentile(samples: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) by the nearest-rank method; 0.0 for no samples."""
    if not samples:
        return 0.0
    ordered = sorted(samples)
    rank = min(len(ordered), max(1, math.ceil(round(q * len(ordered), 9))))
    return ordered[rank - 1]
