"""Checks of what runs beside the data path: the audit trail and the metrics.

The audit check follows the self-test's own records: the sink must take them within
``[selftest] audit_timeout``, they must read back (marked ``kmsguard:selftest``), and
this run's writer's hash chain must verify. It is critical when a classification is
strict (a payment operation must not happen unrecorded), else it warns.
"""

from __future__ import annotations

from kmsguard.policy import SELFTEST_CONTEXT_KEY
from kmsguard.selftest.report import Status, Timer
from kmsguard.selftest.run import Run, describe

AUDIT = "audit"
METRICS = "metrics"


def audit_is_critical(run: Run) -> bool:
    from kmsguard.audit import AuditSettings

    strict = AuditSettings.of(run.settings).strict
    return strict is True or (strict is None and any(c.strict_audit for c in run.settings.policy))


def audit(run: Run, started: float) -> None:
    """The sink takes the run's records, they read back, and the writer's chain verifies; the spool is small."""
    from kmsguard.audit import AuditSettings
    from kmsguard.audit.writer import AuditObserver

    title = "the audit sink takes, returns and chains this run's records"
    timer = Timer()
    try:
        config = AuditSettings.of(run.settings)
        critical = audit_is_critical(run)
    except Exception as exc:
        run.add(AUDIT, title, "fail", describe(exc), critical=True, subject="sink", timer=timer)
        return
    bad: Status = "fail" if critical else "warn"
    if config.sink == "none":
        run.add(AUDIT, title, bad, 'no audit trail ([audit] sink = "none")', critical=critical, subject="sink",
                timer=timer)
        return
    try:
        observer = next(o for o in run.guard().observers if isinstance(o, AuditObserver))
    except Exception as exc:
        run.add(AUDIT, title, bad, describe(exc), critical=critical, subject="sink", timer=timer)
        return
    if not observer.flush(run.options.audit_timeout):
        run.add(AUDIT, title, bad, f"the {config.sink} sink did not take this run's records within "
                f"{run.options.audit_timeout:g} s ({observer.failures} failed deliveries); they wait in the spool",
                critical=critical, subject="sink", timer=timer)
    else:
        problem = _read_back(run, observer.writer_id, started)
        if problem is not None:
            run.add(AUDIT, title, bad, problem, critical=critical, subject="sink", timer=timer)
        else:
            run.add(AUDIT, title, "pass", f"{config.sink}: this run's records read back and their chain verifies",
                    critical=critical, subject="sink", timer=timer)
    _spool(run, observer)


def _read_back(run: Run, writer_id: str, started: float) -> str | None:
    """None when this writer's self-test records are in the sink and its chain verifies; else the problem.

    The records read are those of the last minute, a slice of the writer's chain when the
    writer is the serving Guard's (long-lived): the chain is verified from the slice's start.
    """
    from kmsguard.audit import AuditSettings, Query, keys_for, open_sink
    from kmsguard.audit.record import format_time
    from kmsguard.audit.verify import verify

    try:
        sink = open_sink(AuditSettings.of(run.settings))
    except Exception as exc:
        return f"the sink cannot be opened: {describe(exc)}"
    try:
        found = sorted(
            (r for r in sink.query(Query(since=format_time(started - 60))) if r.writer_id == writer_id),
            key=lambda r: r.seq,
        )
        if not any(SELFTEST_CONTEXT_KEY in r.context for r in found):
            return "this run's records are not in the sink"
        report = verify(found, keys_for(run.settings, run.guard().keyring, sink), window=True)
    except Exception as exc:
        return f"reading the trail back failed: {describe(exc)}"
    finally:
        sink.close()
    if not report.intact:
        return f"this run's chain does not verify: {report.problems[0]}"
    return None


def _spool(run: Run, observer: object) -> None:
    """Undelivered records of this run's writer and of the serving Guard's, against ``spool_warn_mb``."""
    from kmsguard.audit.writer import AuditObserver

    title = "the undelivered audit spool is small"
    observers = [observer]
    if run.serving is not None:
        observers += [o for o in run.serving.observers if isinstance(o, AuditObserver)]
    pending = max(o.spool_bytes for o in observers if isinstance(o, AuditObserver))
    limit = run.options.spool_warn_bytes
    mib = pending / (1 << 20)
    if pending > limit:
        run.add(AUDIT, title, "warn", f"{mib:.1f} MiB wait for the sink (warns above {limit >> 20} MiB)",
                critical=False, subject="spool")
    else:
        run.add(AUDIT, title, "pass", f"{mib:.1f} MiB undelivered (warns above {limit >> 20} MiB)", critical=False,
                subject="spool")


def metrics(run: Run) -> None:
    """The Prometheus registry renders; a configured CloudWatch publisher takes a batch."""
    from kmsguard import metrics as registry_of

    title = "the metrics registry renders; CloudWatch takes a batch"
    timer = Timer()
    try:
        registry = registry_of.of(run.guard().observers)
    except Exception as exc:
        run.add(METRICS, title, "warn", describe(exc), critical=False, timer=timer)
        return
    if registry is None:
        run.add(METRICS, title, "skip", "metrics are off ([metrics] enabled = false)", critical=False, timer=timer)
        return
    try:
        text = registry.exposition()
    except Exception as exc:
        run.add(METRICS, title, "warn", f"the registry does not render: {describe(exc)}", critical=False, timer=timer)
        return
    series = sum(1 for line in text.splitlines() if line and not line.startswith(b"#"))
    detail = f"Prometheus: {series} samples rendered"
    exporter = registry.exporter
    if exporter is not None and exporter.client_factory is not None:
        dropped = exporter.dropped
        exporter.flush()  # the run's own operations are buffered: publish them now
        if exporter.dropped > dropped:
            run.add(METRICS, title, "warn", f"{detail}; CloudWatch PutMetricData refused the batch", critical=False,
                    timer=timer)
            return
        detail += "; CloudWatch took a batch"
    run.add(METRICS, title, "pass", detail, critical=False, timer=timer)
