"""``kmsguard scan``: find unprotected sensitive data in files and directories (a CI gate).

Prints a summary table and each finding's file, location, kind and masked preview (or,
with ``--json``, the same as one JSON document). Values are never printed. Exit status:
0, or 1 when a finding's classification is among ``--fail-on``; 2 for a usage error.
Tokens (``kg1:``) are reported as protected and never fail a scan.
"""

from __future__ import annotations

import json
import sys

import click

from kmsguard.detect.scan import ScanReport, scan_paths


@click.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--json", "as_json", is_flag=True, help="Write the report as JSON.")
@click.option(
    "--fail-on",
    "fail_on",
    default="",
    metavar="CLASS,...",
    help="Exit 1 if a finding of one of these classifications exists (e.g. payment,pii).",
)
def scan(paths: tuple[str, ...], as_json: bool, fail_on: str) -> None:
    """Scan files (JSON, JSON lines, CSV, text, gzip of those) for unprotected sensitive data."""
    gate = {c.strip() for c in fail_on.split(",") if c.strip()}
    report = scan_paths(paths)
    failing = sum(1 for _, f in report.findings() if f.classification in gate)
    if as_json:
        click.echo(json.dumps({**report.to_dict(), "failing": failing}, ensure_ascii=False, indent=2))
    else:
        _print_table(report)
    if failing:
        if not as_json:
            click.echo(f"{failing} finding(s) of class {', '.join(sorted(gate))}", err=True)
        sys.exit(1)


def _print_table(report: ScanReport) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text  # plain text: a path or preview holding "[" is not markup

    console = Console(soft_wrap=True)
    findings = Table(title="Findings", show_lines=False)
    for column in ("file", "location", "kind", "class", "preview"):
        findings.add_column(column, overflow="fold")
    for path, item in report.findings():
        cells = (path, item.location, item.kind, item.classification or "protected", item.preview)
        findings.add_row(*(Text(cell) for cell in cells))
    if findings.row_count:
        console.print(findings)
    summary = Table(title="Summary")
    summary.add_column("kind")
    summary.add_column("count", justify="right")
    for kind, count in sorted(report.counts().items()):
        summary.add_row(kind, str(count))
    console.print(summary)
    console.print(
        f"{report.files_scanned} file(s) scanned ({report.bytes_scanned:,} bytes), "
        f"{report.binary_skipped} binary file(s) skipped, {len(report.unreadable)} unreadable"
    )
