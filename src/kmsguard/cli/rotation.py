"""``kmsguard census``, ``rewrap`` and ``migrate``: stored ciphertexts, counted and moved.

The work is done by :mod:`kmsguard.rotation`; these commands parse options, start
worker processes for ``--workers N`` (each a ``kmsguard`` process of its own, sharing the
job table exactly as processes on other hosts would), show progress and the summary.
Exit status 1 when any value failed (each failure is recorded with its error code).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import click

from kmsguard.cli.io import context_option, parse_context, settings
from kmsguard.errors import InvalidInput
from kmsguard.guard import Guard
from kmsguard.rotation import census as census_mod
from kmsguard.rotation import jobs
from kmsguard.rotation.progress import Progress
from kmsguard.rotation.rewrap import BatchKeys, batch_guard
from kmsguard.rotation.sources import Source, TableSource, open_source

#: Failures listed in a text summary; all of them are in the job table or journal.
SHOWN_FAILURES = 20

json_option = click.option("--json", "as_json", is_flag=True, help="JSON instead of text.")


@click.command()
@click.argument("source")
@json_option
def census(source: str, as_json: bool) -> None:
    """Count stored values by classification x key x region set, from headers only.

    Values that are not envelopes (plaintext, junk) are counted, never shown. The census
    is recorded for 'kmsguard keys status' and 'kmsguard keys retire'.
    """
    s = settings()
    taken = census_mod.take(open_source(source))
    census_mod.record(s.home, taken)
    doc = taken.to_dict()
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    from kmsguard.cli.keys import _table

    _table(
        ("class", "keys", "regions", "count"),
        [
            (g["classification"], "\n".join(g["keys"]), ",".join(g["regions"]) or "-", str(g["count"]))
            for g in doc["groups"]
        ],
    )
    click.echo(
        f"{doc['envelopes']} envelope(s), {doc['not_envelopes']} value(s) that are not envelopes, {doc['total']} in all"
    )


_job_options = [
    click.option("--workers", type=click.IntRange(1, 64), default=1, show_default=True, help="Worker processes."),
    click.option("--batch", type=click.IntRange(1, 100_000), default=500, show_default=True, help="Rows per batch."),
    click.option("--max-rate", type=click.FloatRange(min=1), default=None, help="Cap on rows per second, all workers."),
    click.option("--dry-run", is_flag=True, help="Report what would change; change nothing."),
    click.option(
        "--progress",
        type=click.Choice(["auto", "bar", "json", "none"]),
        default="auto",
        show_default=True,
        help="auto: a bar on a terminal, else JSON lines (stderr).",
    ),
    json_option,
]


def _with_job_options(f: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(_job_options):
        f = option(f)
    return f


@click.command()
@click.argument("source")
@click.option("--class", "classification", default=None, help="Only envelopes of this classification.")
@_with_job_options
def rewrap(source: str, classification: str | None, **opts: Any) -> None:
    """Move every envelope of SOURCE that is not under its classification's current key onto it.

    The data is not decrypted: only the wrapped data keys are replaced. Resumable (run it
    again after a crash), idempotent (a second run changes nothing), and safe beside an
    application writing the same rows (its writes win).
    """
    from kmsguard.rotation.rewrap import Rewrap

    child = ["rewrap", source] + (["--class", classification] if classification else [])
    _job(source, lambda g, k: Rewrap(g, k, classification), child, **opts)


@click.command()
@click.argument("source")
@click.option("--class", "classification", required=True, help="The classification to encrypt under.")
@context_option
@click.option(
    "--context-from",
    "context_from",
    multiple=True,
    metavar="NAME=COLUMN",
    help="Bind the row's COLUMN into each value's context as NAME; repeat for more.",
)
@_with_job_options
def migrate(
    source: str, classification: str, context: tuple[str, ...], context_from: tuple[str, ...], **opts: Any
) -> None:
    """Encrypt the plaintext values of SOURCE in place (text: kg1: tokens; binary: envelopes).

    Values that already are envelopes are left alone. Same job table, workers,
    resumability and concurrent-write guard as 'kmsguard rewrap'.
    """
    from kmsguard.rotation.migrate import Migrate

    fixed = parse_context(context)
    columns: dict[str, str] = {}
    for pair in context_from:
        name, sep, column = pair.partition("=")
        if not sep or not name or not column or name in columns:
            raise click.BadParameter(f"expected NAME=COLUMN once per NAME, got {pair!r}", param_hint="--context-from")
        columns[name] = column
    child = ["migrate", source, "--class", classification]
    child += [a for pair in context for a in ("-c", pair)] + [
        a for pair in context_from for a in ("--context-from", pair)
    ]
    _job(source, lambda g, k: Migrate(g, k, classification, fixed, columns), child, **opts)


def _job(
    url: str,
    make: Callable[[Guard, BatchKeys], jobs.Transform],
    child: list[str],
    *,
    workers: int,
    batch: int,
    max_rate: float | None,
    dry_run: bool,
    progress: str,
    as_json: bool,
) -> None:
    source = open_source(url)
    guard, keys = batch_guard(settings())
    try:
        transform = make(guard, keys)
        if dry_run:
            _report({"dry_run": True, "source": source.label, **jobs.dry_run(source, transform)}, as_json)
            return
        label = f"{transform.kind} {source.label}"
        if workers == 1:
            summary = jobs.run(source, transform, batch, max_rate, Progress(label, progress))
        else:
            summary = _spawn(source, transform, child, workers, batch, max_rate, Progress(label, progress))
    finally:
        guard.close()
    _report({"source": source.label, "kind": transform.kind, **summary}, as_json)
    if summary["failed"]:
        click.get_current_context().exit(1)


def _spawn(
    source: Source,
    transform: jobs.Transform,
    child: list[str],
    workers: int,
    batch: int,
    max_rate: float | None,
    progress: Progress,
) -> dict[str, Any]:
    """Run ``workers`` kmsguard processes on one planned job, showing their progress from the job table."""
    if not isinstance(source, TableSource):
        raise InvalidInput("--workers above 1 needs a table source (files are done by one worker)")
    job, run_no = jobs.plan(source, transform, batch)
    argv = [sys.executable, "-m", "kmsguard", *child, "--batch", str(batch), "--progress", "none", "--json"]
    if max_rate:
        argv += ["--max-rate", str(max(max_rate / workers, 1))]
    procs = [subprocess.Popen(argv, stdout=subprocess.DEVNULL) for _ in range(workers)]
    first = jobs.table_summary(source, job, run_no)
    progress.start(first["planned"], first["rows"])
    while any(p.poll() is None for p in procs):
        time.sleep(1.0)
        progress.update(jobs.table_summary(source, job, run_no)["rows"])
    summary = jobs.table_summary(source, job, run_no)
    progress.update(summary["rows"])
    progress.close()
    crashed = [p.returncode for p in procs if p.returncode not in (0, 1)]
    if crashed or summary["batches_done"] < summary["batches"]:
        raise InvalidInput(
            f"{len(crashed)} worker(s) ended abnormally (exit {crashed}); "
            f"{summary['batches'] - summary['batches_done']} batch(es) remain: run the command again to finish"
        )
    return summary


def _report(summary: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(summary, indent=2, default=str))
        return
    if summary.get("dry_run"):
        click.echo(
            f"dry run: {summary['rows']} value(s): {summary['would_change']} would change, "
            f"{summary['current']} already done, {summary['not_envelopes']} not envelopes; nothing was changed"
        )
        return
    click.echo(
        f"{summary['kind']}: {summary['rows']} row(s) in {summary['batches']} batch(es) by {summary['workers']} "
        f"worker(s): {summary['changed']} changed, {summary['current']} already done, {summary['skipped']} skipped "
        f"(the application changed them meanwhile), {summary['failed']} failed; "
        f"key-service calls: {summary['key_calls']}"
    )
    for failure in summary["failures"][:SHOWN_FAILURES]:
        click.echo(f"failed: {failure['key']}: {failure['code']}", err=True)
    if len(summary["failures"]) > SHOWN_FAILURES:
        click.echo(
            f"... and {len(summary['failures']) - SHOWN_FAILURES} more (job {summary['job']}, run {summary['run']})",
            err=True,
        )
