"""Progress of a long run: a rich bar on a terminal, else one JSON line every few seconds.

Lines go to stderr, so stdout keeps only the run's summary. A JSON line is
``{"event": "progress", "done": N, "total": N, "rows_per_s": R, "eta_s": S}``: rows only,
never a value.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import IO, Any

#: Seconds between two JSON progress lines.
JSON_INTERVAL = 5.0


class Progress:
    """``mode``: ``auto`` (bar on a terminal, else JSON), ``bar``, ``json`` or ``none``."""

    def __init__(self, label: str, mode: str = "auto", stream: IO[str] | None = None) -> None:
        self.stream = stream or sys.stderr
        if mode == "auto":
            mode = "bar" if self.stream.isatty() else "json"
        self.mode = mode
        self.label = label
        self._lock = threading.Lock()
        self.total = 0
        self.done = 0
        self._base = 0
        self._t0 = time.monotonic()
        self._last = self._t0
        self._bar: Any = None
        self._task: Any = None

    def start(self, total: int, done: int = 0) -> None:
        """``done`` rows were finished by an earlier (interrupted) run or by other workers."""
        with self._lock:
            self.total, self.done, self._base = total, done, done
            self._t0 = self._last = time.monotonic()
        if self.mode == "bar":
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as Bar

            self._bar = Bar(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]} rows/s"),
                TimeRemainingColumn(),
                console=Console(file=self.stream),
            )
            self._task = self._bar.add_task(self.label, total=total, completed=done, rate="-")
            self._bar.start()

    def advance(self, rows: int) -> None:
        with self._lock:
            self.update(self.done + rows)

    def update(self, done: int) -> None:
        """Set the rows done (a parent polling its workers' job table)."""
        self.done = done
        now = time.monotonic()
        rate = (done - self._base) / max(now - self._t0, 1e-9)
        if self._bar is not None:
            self._bar.update(self._task, completed=done, rate=f"{rate:,.0f}")
        elif self.mode == "json" and now - self._last >= JSON_INTERVAL:
            self._last = now
            self._line(rate)

    def _line(self, rate: float) -> None:
        eta = (self.total - self.done) / rate if rate > 0 else None
        doc = {"event": "progress", "job": self.label, "done": self.done, "total": self.total}
        doc |= {"rows_per_s": round(rate, 1), "eta_s": round(eta, 1) if eta is not None else None}
        self.stream.write(json.dumps(doc) + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        elif self.mode == "json":
            self._line((self.done - self._base) / max(time.monotonic() - self._t0, 1e-9))


class RateLimit:
    """Caps rows per second for one worker: after each batch, sleeps until the pace is kept."""

    def __init__(self, rows_per_s: float | None) -> None:
        self.rate = rows_per_s
        self._t0 = time.monotonic()
        self._done = 0

    def wait(self, rows: int) -> None:
        if not self.rate:
            return
        self._done += rows
        delay = self._t0 + self._done / self.rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
