"""``kmsguard audit verify|tail|query`` and ``kmsguard metrics``."""

from __future__ import annotations

import contextlib
import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import click

from kmsguard.cli.io import settings

if TYPE_CHECKING:
    from kmsguard.audit import Query


@click.group()
def audit() -> None:
    """Read and verify the audit trail."""


@audit.command()
@click.option("--json", "as_json", is_flag=True, help="A JSON summary instead of text.")
@click.option(
    "--anchor",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also require the chain heads saved by an earlier --save-anchor (catches deleted chains and tails).",
)
@click.option(
    "--save-anchor",
    type=click.Path(dir_okay=False, path_type=Path),
    help="If intact, save every writer's chain head here; keep it where the database's admins cannot write.",
)
@click.pass_context
def verify(ctx: click.Context, as_json: bool, anchor: Path | None, save_anchor: Path | None) -> None:
    """Check every writer's hash chain; exit 1 naming the first altered, removed or moved record."""
    from kmsguard.audit import AuditSettings, keys_for, open_sink
    from kmsguard.audit import verify as chains
    from kmsguard.stack import build_keyring

    s = settings()
    sink = open_sink(AuditSettings.of(s))
    try:
        keys = keys_for(s, build_keyring(s), sink)
        heads = chains.load_anchor(anchor, keys) if anchor is not None else None
        report = chains.verify(sink.records(), keys, heads)
    finally:
        sink.close()
    if save_anchor is not None and report.intact:
        chains.save_anchor(save_anchor, report)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "intact": report.intact,
                    "audit_key": report.key_fingerprint,
                    "writers": report.writers,
                    "records": report.records,
                    "open_writers": report.open_writers,
                    "problems": [vars(p) for p in report.problems],
                }
            )
        )
    elif report.intact:
        click.echo(
            f"intact: {report.records} records from {report.writers} writers"
            f" ({len(report.open_writers)} chains still open; audit key {report.key_fingerprint})"
            + (f"; every record anchored in {anchor} is there" if anchor is not None else "")
        )
        if save_anchor is not None:
            click.echo(f"anchor saved: {save_anchor} ({len(report.heads)} chain heads)")
    else:
        for problem in report.problems:
            click.echo(f"TAMPERED: {problem}")
        click.echo(
            f"{len(report.problems)} of {report.writers} chains broken ({report.records} records;"
            f" audit key {report.key_fingerprint})" + ("; no anchor saved" if save_anchor is not None else "")
        )
    if not report.intact:
        ctx.exit(1)


_output = click.option("--json", "as_json", is_flag=True, help="JSON lines instead of a table.")


@audit.command()
@click.option("-n", "count", type=click.IntRange(min=1), default=20, show_default=True, help="How many records.")
@_output
def tail(count: int, as_json: bool) -> None:
    """The newest records."""
    from kmsguard.audit import Query

    _show(Query(limit=count), as_json)


@audit.command()
@click.option("--since", help="ISO time (2026-11-28T10:00) or an age: 15m, 2h, 7d.")
@click.option("--class", "classification")
@click.option("--op", "operation", help="encrypt, decrypt, rewrap, ...")
@click.option("--outcome", type=click.Choice(["ok", "error"]))
@click.option("--principal")
@click.option("--request-id", help="Records of one request (an HTTP request's X-Request-Id).")
@click.option("--limit", type=click.IntRange(min=1), help="Only the newest N matches.")
@_output
def query(
    since: str | None,
    classification: str | None,
    operation: str | None,
    outcome: str | None,
    principal: str | None,
    request_id: str | None,
    limit: int | None,
    as_json: bool,
) -> None:
    """Records matching every filter given, oldest first."""
    from kmsguard.audit import Query

    q = Query(
        since=_since(since) if since else None,
        classification=classification,
        operation=operation,
        outcome=outcome,
        principal=principal,
        request_id=request_id,
        limit=limit,
    )
    _show(q, as_json)


def _since(value: str) -> str:
    """An age (``15m``) or an ISO time, as the records' own UTC text form for comparison."""
    m = re.fullmatch(r"(\d+)([smhd])", value)
    if m:
        unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[m[2]]
        moment = datetime.now(UTC) - timedelta(**{unit: int(m[1])})
    else:
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            raise click.BadParameter("expected an ISO time or an age like 15m, 2h, 7d", param_hint="--since") from None
        moment = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _show(q: Query, as_json: bool) -> None:
    from kmsguard.audit import AuditSettings, open_sink

    sink = open_sink(AuditSettings.of(settings()))
    try:
        records = sink.query(q)
    finally:
        sink.close()
    if as_json:
        for r in records:
            click.echo(json.dumps(r.to_dict(), separators=(",", ":")))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table()
    for name in ("time", "op", "class", "principal", "outcome", "key", "kms", "cache", "ms", "request"):
        table.add_column(name, overflow="fold")  # an auditor needs every character, not an ellipsis
    for r in records:
        table.add_row(
            r.time,
            r.operation,
            r.classification or "",
            r.principal,
            r.outcome if r.error_code is None else f"{r.outcome} {r.error_code}",
            ", ".join(r.key_refs),
            str(r.kms_calls),
            "" if r.cache_hit is None else ("hit" if r.cache_hit else "miss"),
            f"{r.duration_us / 1000:.2f}",
            r.request_id or "",
        )
    Console().print(table)


@click.command()
@click.option("--since", help="Count operations recorded since: ISO time (2026-11-28T10:00) or an age: 15m, 2h, 7d.")
def metrics(since: str | None) -> None:
    """Print the metrics in the Prometheus text format, counted from the audit trail.

    A one-shot command has run no operations itself, so the operation series
    (``kmsguard_operations_total``, ``kmsguard_operation_duration_seconds``,
    ``kmsguard_operation_errors_total``, cache hits and misses) are counted from every
    operation the audit sink holds (all writers; ``--since`` for a window), and the
    undelivered spool is read from disk. A long-running process reads its live registry
    (``kmsguard.metrics.of(guard.observers)``), which also has the KMS and failover series.
    """
    from kmsguard.audit import AuditSettings, Query, open_sink
    from kmsguard.audit.record import CLOSE_OPERATION
    from kmsguard.metrics import Metrics
    from kmsguard.stack import build_telemetry

    s = settings()
    telemetry = build_telemetry(s)
    registry = telemetry if isinstance(telemetry, Metrics) else Metrics()
    config = AuditSettings.of(s)
    if config.sink != "none":
        sink = open_sink(config)
        try:
            records = sink.query(Query(since=_since(since))) if since else sink.records()
            for r in records:
                if r.operation != CLOSE_OPERATION:
                    registry.count_recorded(r)
        finally:
            sink.close()
    registry.gauge("audit_spool_bytes", _spool_bytes(config.spool_dir))
    click.echo(registry.exposition().decode(), nl=False)
    registry.close()


def _spool_bytes(directory: Path) -> int:
    """``audit_spool_bytes`` read from disk, with the meaning the writer's gauge has.

    The bytes the spool holds against ``max_spool_mb``: each writer's older segments
    whole, and its newest one up to the end of what was written to it (the unwritten
    rest of a preallocated segment is zeros). Not the files' size: a newest segment is
    preallocated whole before anything is written to it.
    """
    from kmsguard.audit.spool import segment_path, segments, writers

    total = 0
    for writer in writers(directory):
        numbers = segments(directory, writer)
        for number in numbers:
            path = segment_path(directory, writer, number)
            with contextlib.suppress(FileNotFoundError):  # delivered and deleted meanwhile
                total += len(path.read_bytes().rstrip(b"\0")) if number == numbers[-1] else path.stat().st_size
    return total
