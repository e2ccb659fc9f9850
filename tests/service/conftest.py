"""Fixtures for the service tests: ``kmsguard serve`` processes with their own homes and API keys.

Servers are module-scoped (starting one costs about a second); each test module that
needs special settings starts its own.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from kmsguard.audit import AuditRecord, AuditSettings, open_sink
from kmsguard.config import load_settings
from kmsguard.keyrings.local import KEY_FILE_NAME, LocalKeyring
from kmsguard.server.apikeys import FileKeyStore, create_key
from kmsguard.testing.moto_server import MotoServer
from kmsguard.testing.plugin import offline_aws_env
from kmsguard.testing.region import KmsRegion
from kmsguard.testing.service import ServiceProcess

#: The API keys every test home gets: name -> scopes.
KEYS = {
    "admin": ["admin:*"],
    "app": ["encrypt:*", "decrypt:*", "rewrap:*", "inspect:*"],
    "general-only": ["encrypt:general", "decrypt:general", "rewrap:general", "inspect:general"],
    "encrypt-only": ["encrypt:*"],
    "inspect-only": ["inspect:*"],
    "revoked": ["admin:*"],
}


@dataclass
class Service:
    """A running service: its URL, home, environment and a token per name of KEYS."""

    process: ServiceProcess
    home: Path
    env: dict[str, str]
    tokens: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.process.url

    def client(self, name: str | None = "app") -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.tokens[name]}"} if name else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)

    def audit_records(self) -> list[AuditRecord]:
        settings = load_settings(self.env)
        sink = open_sink(AuditSettings.of(settings))
        try:
            return list(sink.records())
        finally:
            sink.close()


def base_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KMSGUARD_", "AWS_"))}
    env["KMSGUARD_HOME"] = str(home)
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    return env


AUDIT = 'sink = "jsonl"\nflush_interval = 0.05'


def make_home(home: Path, server: str = "", extra: str = "") -> dict[str, str]:
    """A home with a config file (``[server]`` holding ``server``, a JSON lines audit trail, then
    ``extra``) and API keys (KEYS, "revoked" revoked); returns their tokens."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "kmsguard.toml").write_text(f"[server]\n{server}\n[audit]\n{AUDIT}\n{extra}\n")
    store = FileKeyStore(home / "apikeys.json")
    tokens = {name: create_key(store, name, scopes) for name, scopes in KEYS.items()}
    store.revoke("revoked")
    return tokens


def start_local(home: Path, server: str = "", workers: int = 1) -> Service:
    tokens = make_home(home, server)
    LocalKeyring.create(home / KEY_FILE_NAME, ["general", "pii", "payment"])
    env = base_env(home)
    return Service(ServiceProcess(env, workers=workers).start(), home, env, tokens)


def start_aws(home: Path, region: KmsRegion, server: str = "", extra: str = "") -> Service:
    tokens = make_home(home, server, extra)
    app = f"s{uuid.uuid4().hex[:12]}"
    for c in ("general", "pii", "payment"):
        region.create_key(f"alias/{app}-{c}-development")
    env = base_env(home)
    env.update(offline_aws_env(region, home))
    env.update({"KMSGUARD_BACKEND": "aws", "KMSGUARD_APP": app})
    return Service(ServiceProcess(env).start(), home, env, tokens)


@pytest.fixture(scope="module")
def local_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    service = start_local(tmp_path_factory.mktemp("svc-local"))
    yield service
    service.process.stop()


@pytest.fixture(scope="module")
def service_region(kms_server: MotoServer) -> Iterator[KmsRegion]:
    region = KmsRegion.start("us-east-1", kms_server)
    yield region
    region.close()


@pytest.fixture(scope="module")
def aws_service(tmp_path_factory: pytest.TempPathFactory, service_region: KmsRegion) -> Iterator[Service]:
    service = start_aws(tmp_path_factory.mktemp("svc-aws"), service_region)
    yield service
    service.process.stop()


@pytest.fixture(scope="module")
def limited_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """A service whose API keys may make 2 requests at once, then 1 a second."""
    service = start_local(tmp_path_factory.mktemp("svc-limited"), server="rate_limit = 1\nrate_burst = 2")
    yield service
    service.process.stop()


def kmsguard_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """``kmsguard ARGS`` in a child process with ``env``."""
    return subprocess.run([sys.executable, "-m", "kmsguard", *args], env=env, capture_output=True, text=True,
                          check=False)


@pytest.fixture(scope="module", params=["local", "aws"])
def service(request: pytest.FixtureRequest) -> Service:
    """Each test taking it runs against both backends."""
    fixture: Service = request.getfixturevalue(f"{request.param}_service")
    return fixture
