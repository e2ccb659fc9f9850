"""The people's view of a report: a rich table, the critical checks first, a mark per status."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text

from kmsguard.selftest.report import Report

MARKS = {"pass": ("✔ pass", "green"), "warn": ("▲ warn", "yellow"), "fail": ("✘ fail", "bold red"),
         "skip": ("· skip", "dim")}


def table(report: Report) -> Table:
    t = Table(title=f"kmsguard {report.kind}", title_justify="left")
    for column in ("status", "check", "subject", "critical", "ms", "detail"):
        t.add_column(column, justify="right" if column == "ms" else "left", overflow="fold")
    for r in report.ordered():
        mark, style = MARKS[r.status]
        t.add_row(Text(mark, style=style), r.id, r.subject or "", "yes" if r.critical else "",
                  f"{r.duration_ms:.1f}", r.detail)
    return t


def verdict(report: Report) -> str:
    counts = report.counts()
    summary = ", ".join(f"{counts[s]} {s}" for s in ("pass", "warn", "fail", "skip") if counts[s])
    if report.ok:
        return f"OK ({summary})" + (" [strict]" if report.strict else "")
    failed = sorted({r.id for r in report.critical_failures})
    why = f"critical checks failed: {', '.join(failed)}" if failed else "--strict: a check warned or failed"
    return f"FAILED: {why} ({summary})"


def print_report(report: Report, console: Console | None = None) -> None:
    console = console or Console()
    if not console.is_terminal:
        console.width = 200  # piped or captured: keep each result on one line where it fits
    console.print(table(report))
    console.print(verdict(report), style="green" if report.ok else "bold red", highlight=False)
