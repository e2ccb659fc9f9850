"""``kmsguard selftest`` (this deployment) and ``kmsguard smoke`` (a running service).

Both print a table (or ``--json``, see kmsguard/selftest/schema.json) and exit 0 when
no critical check failed (with ``--strict``: and nothing warned), 1 otherwise, 2 on a
usage error. The checks themselves live in :mod:`kmsguard.selftest`.
"""

from __future__ import annotations

import contextlib
import json

import click

from kmsguard.cli.io import context_option, parse_context
from kmsguard.selftest.report import Report

json_option = click.option("--json", "as_json", is_flag=True, help="The JSON report (see docs/selftest.md).")
strict_option = click.option("--strict", is_flag=True, help="Also exit 1 when any check warns or fails.")


def _emit(report: Report, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        from kmsguard.selftest.render import print_report

        print_report(report)
    click.get_current_context().exit(report.exit_code)


@click.command()
@json_option
@click.option("--class", "classes", multiple=True, metavar="CLASS",
              help="Only this classification (repeat for more; default: all).")
@click.option("--iterations", type=click.IntRange(1, 10_000), default=None,
              help="Latency: operations per classification, cold and warm each (default: [selftest] iterations).")
@strict_option
def selftest(as_json: bool, classes: tuple[str, ...], iterations: int | None, strict: bool) -> None:
    """Validate this deployment: configuration, credentials, keys, round trips, audit, metrics, latency."""
    from kmsguard.config import load_settings
    from kmsguard.errors import KmsGuardError
    from kmsguard.selftest.runner import run_selftest

    settings = None
    with contextlib.suppress(KmsGuardError):  # reported by the config check
        settings = load_settings()
    if settings is not None:
        unknown = [name for name in classes if name not in settings.policy.names()]
        if unknown:
            raise click.BadParameter(f"unknown classification {unknown[0]!r}; known: "
                                     f"{', '.join(settings.policy.names())}", param_hint="--class")
    report = run_selftest(settings, classes=classes if settings is not None else (), iterations=iterations,
                          strict=strict)
    _emit(report, as_json)


@click.command()
@click.option("--url", required=True, help="The service's base URL, e.g. https://kmsguard.internal:8443.")
@click.option("--token", required=True, envvar="KMSGUARD_SMOKE_TOKEN",
              help="An API key with encrypt and decrypt scopes (or KMSGUARD_SMOKE_TOKEN).")
@click.option("--deny-token", default=None, envvar="KMSGUARD_SMOKE_DENY_TOKEN",
              help="An API key without encrypt scope on these classifications: each encrypt must be answered 403.")
@click.option("--class", "classes", multiple=True, metavar="CLASS",
              help="A classification to round-trip (repeat; default: general, pii, payment).")
@context_option
@click.option("--max-latency-ms", type=click.FloatRange(min=0, min_open=True), default=1000.0, show_default=True,
              help="A call slower than this warns (fails with --strict).")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=10.0, show_default=True,
              help="Seconds per HTTP call.")
@json_option
@strict_option
def smoke(url: str, token: str, deny_token: str | None, classes: tuple[str, ...], context: tuple[str, ...],
          max_latency_ms: float, timeout: float, as_json: bool, strict: bool) -> None:
    """Smoke-test a running service after a deploy, over HTTP only (no configuration or keys needed)."""
    try:
        from kmsguard.selftest.smoke import DEFAULT_CLASSES, run_smoke
    except ImportError:
        raise click.UsageError("smoke needs httpx: install kmsguard[server]") from None

    report = run_smoke(
        url.rstrip("/"),
        token,
        deny_token=deny_token,
        classes=classes or DEFAULT_CLASSES,
        context=parse_context(context) if context else None,
        max_latency_ms=max_latency_ms,
        timeout=timeout,
        strict=strict,
    )
    _emit(report, as_json)
