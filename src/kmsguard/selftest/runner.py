"""``run_selftest``: every check, in order, into one :class:`~kmsguard.selftest.report.Report`.

The order follows dependency: configuration, credentials, keys, connectivity, then the
operations (roundtrip, multi_region), the audit trail of those operations, metrics, and
latency last (it is the longest). A configuration that does not load (``[audit]`` and,
on AWS, ``[aws]`` included) fails ``config`` and skips the rest, saying so.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

from kmsguard.config import Settings, load_settings
from kmsguard.guard import Guard
from kmsguard.selftest import crypto, infra, ops
from kmsguard.selftest.report import Report, Result, Timer
from kmsguard.selftest.run import Run, describe
from kmsguard.selftest.settings import SelftestSettings

CONFIG = "config"
#: Every check id, in run order.
CHECKS = (
    CONFIG,
    infra.CREDENTIALS,
    infra.KEYS,
    infra.CONNECTIVITY,
    crypto.ROUNDTRIP,
    crypto.MULTI_REGION,
    ops.AUDIT,
    ops.METRICS,
    crypto.LATENCY,
)


def run_selftest(
    settings: Settings | None = None,
    *,
    env: Mapping[str, str] | None = None,
    classes: Sequence[str] = (),
    iterations: int | None = None,
    strict: bool = False,
    serving: Guard | None = None,
) -> Report:
    """Run the self-test against ``settings`` (else those loaded from ``env``, else the process').

    ``classes`` limits the classification checks to those named (all when empty; an
    unknown name is an UnknownClassification error, raised before anything runs).
    ``serving``: the service's own Guard, whose audit spool the audit check also reads.
    """
    report = Report("selftest", strict=strict)
    started = time.time()
    timer = Timer()
    title = "the configuration loads"
    try:
        settings = settings if settings is not None else load_settings(env)
        options = SelftestSettings.of(settings)
        _validate_components(settings)
    except Exception as exc:
        report.add(Result(CONFIG, title, True, "fail", describe(exc), None, timer.stop()))
        for check in CHECKS[1:]:
            report.add(Result(check, check.replace("_", " "), False, "skip", "the configuration did not load"))
        report.duration_ms = (time.time() - started) * 1000
        return report
    chosen = [settings.policy.get(name) for name in dict.fromkeys(classes)] or list(settings.policy)
    run = Run(settings, options, report, chosen, strict=strict, serving=serving)
    report.facts.update(
        backend=settings.backend,
        environment=settings.environment,
        app=settings.app,
        principal=settings.principal,
        classifications=[c.name for c in chosen],
    )
    names = ", ".join(c.name for c in chosen)
    run.add(CONFIG, title, "pass", f"backend {settings.backend}, environment {settings.environment}, "
            f"principal {settings.principal}, classifications {names}", critical=True, timer=timer)
    try:
        infra.credentials(run)
        infra.keys(run)
        infra.connectivity(run)
        crypto.roundtrip(run)
        crypto.multi_region(run)
        ops.audit(run, started)
        ops.metrics(run)
        crypto.latency(run, iterations or options.iterations)
    finally:
        run.close(options.audit_timeout)
        report.duration_ms = (time.time() - started) * 1000
    return report


def _validate_components(settings: Settings) -> None:
    """The component tables the run depends on, validated now, so a bad one fails ``config`` naming its setting."""
    from kmsguard.audit import AuditSettings

    AuditSettings.of(settings)
    if settings.backend == "aws":
        from kmsguard.aws import AwsSettings
        from kmsguard.keyrings.multi_region import MultiRegionOptions

        AwsSettings.from_section(settings.section("aws"), settings.env, settings.environment)
        MultiRegionOptions.from_section(settings.section("aws"))
