"""Helpers every benchmark topic shares: a timing loop and a plain-text table."""

from __future__ import annotations

import time
import timeit
from collections.abc import Callable, Sequence


def ops_per_second(fn: Callable[[], object], seconds: float = 0.4) -> float:
    """Call ``fn`` repeatedly for about ``seconds`` (after one warm-up call); return calls per second."""
    fn()
    calls, batch = 0, 1
    start = time.perf_counter()
    while True:
        for _ in range(batch):
            fn()
        calls += batch
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return calls / elapsed
        batch = min(batch * 2, 1024)


def best_us(calls: Sequence[Callable[[], object]], repeat: int, number: int) -> list[float]:
    """Best-of-``repeat`` microseconds per call for each of ``calls``, timed in turn so load hits all alike."""
    best = [float("inf")] * len(calls)
    for _ in range(repeat):
        for i, call in enumerate(calls):
            best[i] = min(best[i], timeit.timeit(call, number=number) / number * 1e6)
    return best


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table (readable in a terminal, pasteable into docs/benchmarks.md)."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in rows)])


def size_label(n: int) -> str:
    for unit, scale in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} B"
