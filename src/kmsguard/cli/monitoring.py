"""``kmsguard monitoring``: Prometheus rules, a Grafana dashboard and CloudWatch alarms, generated."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import click

from kmsguard.cli.io import settings
from kmsguard.monitoring.thresholds import Thresholds


def threshold_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """``--error-ratio``, ``--kms-latency-p99``, ...: one flag per Thresholds field, with its default."""
    for name, default, text in reversed(Thresholds.flags()):
        flag = "--" + name.replace("_", "-")
        command = click.option(flag, name, type=float, default=default, show_default=True, help=text)(command)
    return command


@click.group()
def monitoring() -> None:
    """Generate alert rules, dashboards and CloudWatch alarms over kmsguard's metrics."""


def runbook_option(command: Callable[..., Any]) -> Callable[..., Any]:
    """``--runbook-base``: where the runbook links of the alerts (and alarms) point."""
    from kmsguard.monitoring.prometheus import DEFAULT_RUNBOOK_BASE

    return click.option(
        "--runbook-base",
        metavar="URL",
        default=DEFAULT_RUNBOOK_BASE,
        show_default=True,
        help="URL of the monitoring page where your team hosts kmsguard's docs (the default is a path, not a "
        "link); each alert's runbook is it plus #<alert name in lower case>.",
    )(command)


@monitoring.command("prometheus-rules")
@threshold_options
@runbook_option
def prometheus_rules(runbook_base: str, **thresholds: float) -> None:
    """Print Prometheus alerting and recording rules (YAML): `kmsguard monitoring prometheus-rules > rules.yml`."""
    from kmsguard.monitoring import prometheus

    click.echo(prometheus.render(Thresholds(**thresholds), runbook_base), nl=False)


@monitoring.command("grafana-dashboard")
@click.option("--title", default="kmsguard", show_default=True, help="The dashboard's title.")
@click.option("--uid", default="kmsguard", show_default=True, help="The dashboard's uid (stable across imports).")
def grafana_dashboard(title: str, uid: str) -> None:
    """Print a Grafana dashboard (JSON model) over a Prometheus data source."""
    from kmsguard.monitoring import grafana

    click.echo(grafana.render(title, uid), nl=False)


@monitoring.group()
def cloudwatch() -> None:
    """CloudWatch dashboard and alarms over the metrics kmsguard publishes ([metrics] emf / cloudwatch)."""


@cloudwatch.command("apply")
@click.option("--dry-run", is_flag=True, help="Print the JSON that would be sent; call nothing.")
@click.option("--alarm-topic", metavar="ARN", default=None, help="SNS topic the alarms notify (alarm and OK).")
@click.option("--dashboard", default="kmsguard", show_default=True, help="The dashboard's name.")
@click.option("--alarm-prefix", default="kmsguard", show_default=True, help="Every alarm's name starts with this.")
@runbook_option
@threshold_options
def apply(
    dry_run: bool, alarm_topic: str | None, dashboard: str, alarm_prefix: str, runbook_base: str,
    **thresholds: float,
) -> None:
    """Create or update the dashboard (PutDashboard) and alarms (PutMetricAlarm); a second run changes nothing.

    Namespace, region and endpoint come from [metrics] (namespace, region, endpoint_url); one
    series per operation and configured classification, and (backend "aws") per KMS region of [aws].
    """
    from kmsguard.metrics import cloudwatch_client
    from kmsguard.monitoring import cloudwatch as cw

    s = settings()
    regions: tuple[str, ...] = ()
    if s.backend == "aws":
        from kmsguard.aws import AwsSettings

        regions = AwsSettings.from_section(s.section("aws"), s.env, s.environment).regions
    with cw.aws_errors():
        namespace, client = cloudwatch_client(s)
    target = cw.Target(
        namespace=namespace,
        classifications=[c.name for c in s.policy],
        region=client.meta.region_name,
        dashboard=dashboard,
        alarm_prefix=alarm_prefix,
        alarm_topic=alarm_topic,
        thresholds=Thresholds(**thresholds),
        regions=regions,
        runbook_base=runbook_base,
    )
    if dry_run:
        click.echo(json.dumps(cw.plan(target), indent=2))
        return
    with cw.aws_errors():
        changes = cw.apply(client, target)
    for change in changes:
        click.echo(f"{change.kind} {change.name}: {change.action}")
    changed = sum(c.action != "unchanged" for c in changes)
    click.echo(f"{changed} changed, {len(changes) - changed} unchanged" if changed else "no changes: all up to date")
