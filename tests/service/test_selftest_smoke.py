"""``GET /v1/selftest`` on a running service, and ``kmsguard smoke`` against one, from a bare machine.

The smoke command runs as a child process whose environment has no kmsguard home,
configuration or keys: only the URL and the tokens, as in a post-deploy CI job.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from kmsguard.selftest.report import schema
from kmsguard.testing.plugin import offline_aws_env
from kmsguard.testing.region import KmsRegion
from kmsguard.testing.service import ServiceProcess

from .conftest import Service, base_env, make_home


def smoke(tmp_path: Path, *args: str) -> tuple[int, str]:
    """``kmsguard smoke ARGS`` with no kmsguard configuration anywhere (an empty, unwritable home)."""
    bare = tmp_path / "bare"
    bare.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KMSGUARD_", "AWS_"))}
    env.update(KMSGUARD_HOME=str(bare), NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    proc = subprocess.run([sys.executable, "-m", "kmsguard", "smoke", *args], capture_output=True, text=True,
                          env=env, timeout=120, check=False)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert list(bare.iterdir()) == [], "smoke wrote nothing locally"
    return proc.returncode, proc.stdout


def smoke_json(tmp_path: Path, *args: str) -> tuple[int, dict[str, Any]]:
    code, out = smoke(tmp_path, *args, "--json")
    doc: dict[str, Any] = json.loads(out)
    jsonschema.validate(doc, schema())
    assert doc["kind"] == "smoke" and doc["exit_code"] == code
    return code, doc


def by_check(doc: dict[str, Any]) -> dict[str, str]:
    """The worst status per check id."""
    order = ["fail", "warn", "pass", "skip"]
    out: dict[str, str] = {}
    for c in doc["checks"]:
        if c["id"] not in out or order.index(c["status"]) < order.index(out[c["id"]]):
            out[c["id"]] = c["status"]
    return out


@pytest.fixture(scope="module")
def sts_service(tmp_path_factory: pytest.TempPathFactory, service_region: KmsRegion) -> Iterator[Service]:
    """A service on AWS (moto through the proxy) whose STS is moto's too, keys rotating."""
    home = tmp_path_factory.mktemp("svc-selftest-aws")
    tokens = make_home(home, extra="[aws]\nmax_attempts = 1\noperation_timeout = 3\n[selftest]\niterations = 2\n")
    app = f"s{uuid.uuid4().hex[:12]}"
    for c in ("general", "pii", "payment"):
        service_region.admin.enable_key_rotation(KeyId=service_region.create_key(f"alias/{app}-{c}-development"))
    env = base_env(home)
    env.update(offline_aws_env(service_region, home))
    env.update({"KMSGUARD_BACKEND": "aws", "KMSGUARD_APP": app, "AWS_ENDPOINT_URL_STS": service_region.server.url})
    service = Service(ServiceProcess(env).start(), home, env, tokens)
    yield service
    service.process.stop()


# ---------------------------------------------------------------------- GET /v1/selftest


def test_selftest_endpoint_is_for_admins_and_reuses_its_answer(sts_service: Service) -> None:
    with sts_service.client("app") as app, sts_service.client(None) as anonymous:
        assert app.get("/v1/selftest").status_code == 403
        assert anonymous.get("/v1/selftest").status_code == 401
    with sts_service.client("admin") as admin, ThreadPoolExecutor(3) as pool:
        # Three at once: one run, whose answer all three get (and the next caller, within 30 s).
        answers = list(pool.map(lambda _: admin.get("/v1/selftest", timeout=120), range(3)))
        assert [a.status_code for a in answers] == [200, 200, 200], answers[0].text
        doc = answers[0].json()
        jsonschema.validate(doc, schema())
        assert doc["kind"] == "selftest" and doc["ok"] is True
        assert by_check(doc)["credentials"] == by_check(doc)["roundtrip"] == "pass"
        again = admin.get("/v1/selftest", timeout=120).json()
        assert all(a.json() == doc for a in answers) and again == doc


def test_selftest_endpoint_answers_503_when_kms_is_dead(
    tmp_path_factory: pytest.TempPathFactory, service_region: KmsRegion
) -> None:
    home = tmp_path_factory.mktemp("svc-selftest-dead")
    tokens = make_home(home, extra="[aws]\nmax_attempts = 1\noperation_timeout = 2\n[selftest]\niterations = 1\n"
                       "audit_timeout = 1\n")
    region = KmsRegion.start("us-east-1", service_region.server)
    app = f"s{uuid.uuid4().hex[:12]}"
    for c in ("general", "pii", "payment"):
        region.create_key(f"alias/{app}-{c}-development")
    env = base_env(home)
    env.update(offline_aws_env(region, home))
    env.update({"KMSGUARD_BACKEND": "aws", "KMSGUARD_APP": app, "AWS_ENDPOINT_URL_STS": region.server.url})
    service = Service(ServiceProcess(env).start(), home, env, tokens)
    try:
        region.proxy.outage("refuse")
        with service.client("admin") as admin:
            answer = admin.get("/v1/selftest", timeout=120)
        assert answer.status_code == 503
        checks = by_check(answer.json())
        assert checks["connectivity"] == checks["roundtrip"] == "fail"
    finally:
        service.process.stop()
        region.close()


# ---------------------------------------------------------------------- kmsguard smoke


def test_smoke_passes_against_a_healthy_service(local_service: Service, tmp_path: Path) -> None:
    code, doc = smoke_json(tmp_path, "--url", local_service.url, "--token", local_service.tokens["app"],
                           "--deny-token", local_service.tokens["inspect-only"])
    checks = by_check(doc)
    assert code == 0, doc
    assert {k: checks[k] for k in ("healthz", "readyz", "auth", "deny", "roundtrip")} == dict.fromkeys(
        ("healthz", "readyz", "auth", "deny", "roundtrip"), "pass")
    assert checks["metrics"] == "warn"  # the app key may not read /metrics
    assert {c["subject"] for c in doc["checks"] if c["id"] == "roundtrip"} == {"general", "pii", "payment"}
    code, doc = smoke_json(tmp_path, "--url", local_service.url, "--token", local_service.tokens["admin"],
                           "--class", "general")
    assert code == 0 and by_check(doc)["metrics"] == "pass"
    code, table = smoke(tmp_path, "--url", local_service.url, "--token", local_service.tokens["app"])
    assert code == 0 and "roundtrip" in table and "OK (" in table


def test_smoke_fails_with_a_wrong_token_or_a_deny_token_that_is_allowed(
    local_service: Service, tmp_path: Path
) -> None:
    code, doc = smoke_json(tmp_path, "--url", local_service.url, "--token", "kg_not_a_key")
    assert code == 1 and by_check(doc)["roundtrip"] == "fail"
    assert "HTTP 401" in next(c["detail"] for c in doc["checks"] if c["id"] == "roundtrip")
    code, doc = smoke_json(tmp_path, "--url", local_service.url, "--token", local_service.tokens["app"],
                           "--deny-token", local_service.tokens["general-only"])
    assert code == 1 and by_check(doc)["deny"] == "fail"


def test_smoke_fails_against_a_stopped_service(tmp_path: Path) -> None:
    home = tmp_path / "home"
    tokens = make_home(home)
    from kmsguard.keyrings.local import KEY_FILE_NAME, LocalKeyring

    LocalKeyring.create(home / KEY_FILE_NAME, ["general", "pii", "payment"])
    process = ServiceProcess(base_env(home)).start()
    url = process.url
    process.stop()
    code, doc = smoke_json(tmp_path, "--url", url, "--token", tokens["app"], "--timeout", "5")
    assert code == 1
    checks = by_check(doc)
    assert checks["healthz"] == "fail" and checks["roundtrip"] == "skip"


def test_smoke_fails_naming_readyz_and_roundtrip_when_kms_is_dead(
    tmp_path_factory: pytest.TempPathFactory, service_region: KmsRegion, tmp_path: Path
) -> None:
    home = tmp_path_factory.mktemp("svc-smoke-dead")
    tokens = make_home(home, "ready_interval = 0.1", "[aws]\nmax_attempts = 1\noperation_timeout = 2\n")
    region = KmsRegion.start("us-east-1", service_region.server)
    app = f"s{uuid.uuid4().hex[:12]}"
    for c in ("general", "pii", "payment"):
        region.create_key(f"alias/{app}-{c}-development")
    env = base_env(home)
    env.update(offline_aws_env(region, home))
    env.update({"KMSGUARD_BACKEND": "aws", "KMSGUARD_APP": app})
    process = ServiceProcess(env).start()
    try:
        region.proxy.outage("refuse")
        code, doc = smoke_json(tmp_path, "--url", process.url, "--token", tokens["app"], "--class", "general")
    finally:
        process.stop()
        region.close()
    checks = by_check(doc)
    assert code == 1
    assert checks["healthz"] == "pass" and checks["readyz"] == "fail" and checks["roundtrip"] == "fail"
