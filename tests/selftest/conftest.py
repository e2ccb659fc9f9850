"""Homes for the self-test: a healthy local install and a healthy AWS (moto) install, quick settings.

The self-test runs in process (``run_selftest``, reading the environment as the command
does) where a test looks at results, and as the real command where it looks at output
and exit codes. Iterations are few and timeouts short: these tests check verdicts, not
speed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kmsguard.selftest.report import Report, schema
from kmsguard.testing import KmsRegion

#: Quick self-test settings: two iterations, the audit sink given 5 s.
QUICK = "[selftest]\niterations = 2\naudit_timeout = 5\n"
#: A thread deliverer (no child process) that delivers often.
AUDIT = '[audit]\ndelivery = "thread"\nflush_interval = 0.05\n'
#: Fail fast against a dead or slow endpoint.
AWS = "[aws]\nmax_attempts = 1\nconnect_timeout = 1\nread_timeout = 3\noperation_timeout = 5\n"


def fail_fast_audit() -> None:
    """Give the sink one second: where KMS (and so the AWS audit key) is out of reach, the audit check
    waits that long for the flush and the close, not the default five each."""
    path = Path(os.environ["KMSGUARD_HOME"]) / "kmsguard.toml"
    path.write_text(path.read_text().replace("audit_timeout = 5", "audit_timeout = 1"))


def write_config(home: Path, *parts: str) -> None:
    home.mkdir(parents=True, exist_ok=True)
    (home / "kmsguard.toml").write_text("\n".join(parts))


def statuses(report: Report, check: str) -> dict[str | None, str]:
    """``{subject: status}`` of one check's results."""
    return {r.subject: r.status for r in report.results if r.id == check}


def assert_healthy(report: Report) -> None:
    """Every check passed or skipped with a reason; the verdict is 0."""
    bad = [(r.id, r.subject, r.status, r.detail) for r in report.results if r.status not in ("pass", "skip")]
    assert not bad, bad
    assert all(r.detail for r in report.results if r.status == "skip")
    assert report.exit_code == 0


def validate(doc: dict[str, Any]) -> None:
    import jsonschema

    jsonschema.validate(doc, schema(), format_checker=jsonschema.FormatChecker())


def kmsguard(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The real command, in a child with this process' environment (which the fixtures set)."""
    proc = subprocess.run([sys.executable, "-m", "kmsguard", *args], capture_output=True, text=True, timeout=180,
                          env=env if env is not None else dict(os.environ), check=False)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def json_report(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(proc.stdout)
    validate(doc)
    return doc


@pytest.fixture
def local_home(home: Path, keyring: object) -> Path:
    """A healthy local install (the keyring fixture made its keys)."""
    write_config(home, AUDIT, QUICK)
    return home


@pytest.fixture
def aws_home(
    kmsguard_aws_env: dict[str, str], kms_region: KmsRegion, monkeypatch: pytest.MonkeyPatch
) -> dict[str, str]:
    """A healthy AWS install on moto: keys with rotation on, STS served by moto (straight, not the proxy)."""
    for arn in kmsguard_aws_env.values():
        kms_region.admin.enable_key_rotation(KeyId=arn)
    monkeypatch.setenv("AWS_ENDPOINT_URL_STS", kms_region.server.url)
    write_config(Path(os.environ["KMSGUARD_HOME"]), AWS, AUDIT, QUICK)
    return kmsguard_aws_env
