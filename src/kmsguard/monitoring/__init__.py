"""Monitoring artifacts generated from kmsguard's own metric names.

``prometheus`` (alerting and recording rules), ``grafana`` (a dashboard), ``cloudwatch``
(a dashboard and alarms, applied idempotently). ``thresholds`` holds the alert
thresholds they share, each with its documented default (docs/monitoring.md).
"""
