"""A real Prometheus scraping a real ``kmsguard serve`` (AWS backend, two moto regions) on loopback:
every metric and label the generated rules and dashboard use exists, queried over Prometheus's HTTP API."""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from kmsguard.monitoring import grafana, prometheus
from kmsguard.testing.moto_server import free_port
from kmsguard.testing.plugin import offline_aws_env
from kmsguard.testing.region import KmsRegion
from kmsguard.testing.service import ServiceProcess

from .promql import grafana_to_promql, missing


def base_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KMSGUARD_", "AWS_", "OTEL_"))}
    env["KMSGUARD_HOME"] = str(home)
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    return env


#: What the traffic encrypts and the context it sends: distinctive, so that a scan can tell they leaked nowhere.
PLAINTEXT = "plaintext-7c41e9"
CONTEXT_VALUE = "ctx-value-d2b80f"


def _serve(home: Path, east: KmsRegion, west: KmsRegion, extra_config: str = "") -> ServiceProcess:
    app = f"m{uuid.uuid4().hex[:12]}"
    for region in (east, west):
        for cls in ("general", "pii", "payment"):
            region.create_key(f"alias/{app}-{cls}-development")
    home.mkdir()
    (home / "kmsguard.toml").write_text(
        '[server]\nauth = "none"\nmetrics_auth = false\n'
        '[audit]\nsink = "jsonl"\nflush_interval = 0.05\n'
        f'[aws]\nregions = ["{east.name}", "{west.name}"]\nbreaker_failures = 1\nbreaker_cooldown = 600\n'
        "max_attempts = 2\nhedge = false\n"
        f'[aws.endpoints]\n"{east.name}" = "{east.endpoint}"\n"{west.name}" = "{west.endpoint}"\n'
        + extra_config
    )
    env = base_env(home)
    env.update(offline_aws_env(east, home))
    env.update({"KMSGUARD_BACKEND": "aws", "KMSGUARD_APP": app})
    return ServiceProcess(env).start()


def _traffic(url: str, east: KmsRegion) -> None:
    """Operations of every kind, errors, throttling, a failover and an open breaker."""
    with httpx.Client(base_url=url, timeout=60) as http:
        def encrypt(cls: str, n: int) -> str:
            body = {"classification": cls, "context": {"purpose": CONTEXT_VALUE, "n": str(n)}, "plaintext": PLAINTEXT}
            answer = http.post("/v1/encrypt", json=body)
            assert answer.status_code == 200, answer.text
            return str(answer.json()["token"])

        assert http.get("/v1/selftest", timeout=120).status_code in (200, 503)  # kmsguard_selftest_failed_checks
        tokens = [encrypt(cls, 0) for cls in ("general", "pii", "payment")]
        tokens += [encrypt("general", 0) for _ in range(3)]  # cache hits
        context = {"purpose": CONTEXT_VALUE, "n": "0"}
        for token in tokens:
            assert http.post("/v1/decrypt", json={"token": token, "context": context}).is_success
        assert http.post("/v1/rewrap", json={"token": tokens[0], "context": context}).is_success
        wrong = {"token": tokens[0], "context": {"purpose": "other", "n": "0"}}
        assert http.post("/v1/decrypt", json=wrong).status_code == 400  # CONTEXT_MISMATCH
        east.proxy.throttle(count=1)
        encrypt("pii", 1)  # a cache miss, throttled once in us-east-1, then served
        east.proxy.outage("refuse")
        encrypt("pii", 2)  # us-east-1 refuses: the breaker opens, the operation fails over to eu-west-1


@pytest.fixture
def scraped(
    tmp_path: Path, kms_regions: Callable[..., list[KmsRegion]], prometheus_bin: str
) -> Iterator[Callable[[str, dict[str, str] | None], Any]]:
    east, west = kms_regions("us-east-1", "eu-west-1")
    service = _serve(tmp_path / "home", east, west)
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"scrape_configs:\n- job_name: kmsguard\n  static_configs:\n  - targets: ['127.0.0.1:{service.port}']\n"
    )
    log = (tmp_path / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [prometheus_bin, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )
    api = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30, trust_env=False)

    def query(path: str, params: dict[str, str] | None = None) -> Any:
        answer = api.get(path, params=params)
        assert answer.status_code == 200, answer.text
        return answer.json()["data"]

    try:
        _traffic(service.url, east)
        scraped_after = time.time() + 1
        deadline = time.monotonic() + 90
        while True:  # the first scrape after the traffic, with the breaker and rotation series in it
            try:
                targets = query("/api/v1/targets")["activeTargets"]
                fresh = [t for t in targets if t["health"] == "up" and _ts(t["lastScrape"]) > scraped_after]
                if fresh and query("/api/v1/series", {"match[]": "kmsguard_key_rotation_enabled"}):
                    break
            except (httpx.HTTPError, AssertionError):
                pass
            assert time.monotonic() < deadline and proc.poll() is None, (tmp_path / "prometheus.log").read_text()
            time.sleep(0.5)
        yield query
    finally:
        api.close()
        proc.terminate()
        proc.wait(30)
        log.close()
        service.stop()


def _ts(rfc3339: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()


def _exported(query: Callable[[str, dict[str, str] | None], Any]) -> dict[str, set[str]]:
    names: dict[str, set[str]] = {}
    for series in query("/api/v1/series", {"match[]": '{__name__=~"kmsguard_.*", job="kmsguard"}'}):
        names.setdefault(series.pop("__name__"), set()).update(series)
    return names


def test_every_metric_and_label_of_the_rules_and_dashboard_is_scraped(
    scraped: Callable[[str, dict[str, str] | None], Any],
) -> None:
    exported = _exported(scraped)
    exprs = {r.get("alert") or r.get("record"): r["expr"] for g in prometheus.rules()["groups"] for r in g["rules"]}
    for row, panels in grafana.ROWS:
        for panel in panels:
            for n, (expr, _) in enumerate(panel.targets):
                exprs[f"{row}/{panel.title}/{n}"] = grafana_to_promql(expr)
    problems = {name: missing(expr, exported) for name, expr in exprs.items()}
    assert {k: v for k, v in problems.items() if v} == {}
    for name, expr in exprs.items():  # Prometheus itself accepts each one
        assert scraped("/api/v1/query", {"query": expr}) is not None, name
    # The series behind the alerts that watch an outage carry what this traffic caused.
    breaker = scraped("/api/v1/query", {"query": 'kmsguard_region_breaker_state{region="us-east-1", state="open"}'})
    assert [s["value"][1] for s in breaker["result"]] == ["1"]
    assert scraped("/api/v1/query", {"query": "kmsguard_failovers_total"})["result"]
    assert scraped("/api/v1/query", {"query": "kmsguard_kms_throttles_total > 0"})["result"]
    rotation = scraped("/api/v1/query", {"query": "kmsguard_key_rotation_enabled"})["result"]
    assert {s["metric"]["classification"] for s in rotation} == {"general", "pii", "payment"}
    statuses = scraped("/api/v1/query", {"query": "sum by (status) (kmsguard_http_requests_total)"})["result"]
    assert {"200", "400"} <= {s["metric"]["status"] for s in statuses}
