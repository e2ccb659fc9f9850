"""API keys: the 401/403 matrix, revocation across workers, rate limits, the CLI and both stores."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
import psycopg
import pytest

from audit.pgserver import PostgresUnavailable, ThrowawayPostgres
from audit.tcpproxy import TcpProxy
from kmsguard.config import load_settings
from kmsguard.errors import ConfigurationError, InvalidInput
from kmsguard.keyrings.local import KEY_FILE_NAME, LocalKeyring
from kmsguard.server.apikeys import FileKeyStore, KeyIndex, PostgresKeyStore, Scope, create_key, new_token
from kmsguard.server.app import create_app
from kmsguard.server.settings import ServerSettings
from kmsguard.testing.service import ServiceProcess

from .conftest import Service, base_env, kmsguard_cli, start_local


@pytest.fixture(scope="module")
def pg_dsn() -> Iterator[str]:
    """$KMSGUARD_TEST_PG_DSN, else a throwaway server of this module's own (see tests/audit/pgserver.py)."""
    if os.environ.get("KMSGUARD_TEST_PG_DSN"):
        yield os.environ["KMSGUARD_TEST_PG_DSN"]
        return
    server = ThrowawayPostgres()
    try:
        server.start()
    except PostgresUnavailable as e:
        pytest.fail(str(e), pytrace=False)
    try:
        yield server.dsn
    finally:
        server.stop()


@pytest.fixture(scope="module")
def general_token(local_service: Service) -> str:
    with local_service.client() as c:
        return str(c.post("/v1/encrypt", json={"classification": "pii", "plaintext": "x"}).json()["token"])


@pytest.fixture(scope="module")
def pii_record(local_service: Service) -> dict[str, object]:
    """A record whose one field is protected as pii."""
    with local_service.client() as c:
        body = {"record": {"email": "jane@example.com"}, "fields": {"$.email": "pii"}}
        return dict(c.post("/v1/protect", json=body).json()["record"])


def _requests(pii_token: str, pii_record: dict[str, object]) -> dict[str, tuple[str, str, dict[str, object] | None]]:
    """Endpoint -> (method, path, body). Encrypts are of pii data; envelopes are pii ones."""
    return {
        "protect": ("POST", "/v1/protect", {"record": {"email": "x"}, "fields": {"$.email": "pii"}}),
        "unprotect": ("POST", "/v1/unprotect", {"record": pii_record}),
        "mask": ("POST", "/v1/mask", {"record": {"email": "x"}, "fields": ["$.email"]}),
        "scan": ("POST", "/v1/scan", {"text": "x"}),
        "encrypt": ("POST", "/v1/encrypt", {"classification": "pii", "plaintext": "x"}),
        "encrypt/batch": ("POST", "/v1/encrypt/batch", {"items": [{"classification": "pii", "plaintext": "x"}]}),
        "decrypt": ("POST", "/v1/decrypt", {"token": pii_token}),
        "decrypt/batch": ("POST", "/v1/decrypt/batch", {"items": [{"token": pii_token}]}),
        "rewrap": ("POST", "/v1/rewrap", {"token": pii_token}),
        "inspect": ("POST", "/v1/inspect", {"token": pii_token}),
        "metrics": ("GET", "/metrics", None),
    }


#: The key lacking each endpoint's operation (but holding others).
LACKS_OPERATION = {
    "protect": "inspect-only",
    "unprotect": "encrypt-only",
    "mask": "encrypt-only",
    "scan": "encrypt-only",
    "encrypt": "inspect-only",
    "encrypt/batch": "inspect-only",
    "decrypt": "encrypt-only",
    "decrypt/batch": "encrypt-only",
    "rewrap": "encrypt-only",
    "inspect": "encrypt-only",
    "metrics": "app",
}


@pytest.mark.parametrize("endpoint", list(LACKS_OPERATION))
def test_auth_matrix(local_service: Service, general_token: str, pii_record: dict[str, object], endpoint: str) -> None:
    method, path, body = _requests(general_token, pii_record)[endpoint]

    def call(authorization: str | None) -> httpx.Response:
        headers = {"Authorization": authorization} if authorization else {}
        return httpx.request(method, local_service.url + path, json=body, headers=headers)

    for authorization in (None, "Basic dXNlcjpwYXNz", f"Bearer {new_token()}", "Bearer kgk_short",
                          f"Bearer {local_service.tokens['revoked']}"):
        r = call(authorization)
        assert r.status_code == 401, (authorization, r.text)
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert r.json()["error"]["code"] == "UNAUTHENTICATED"
    denied = call(f"Bearer {local_service.tokens[LACKS_OPERATION[endpoint]]}")
    assert denied.status_code == 403 and denied.json()["error"]["code"] == "ACCESS_DENIED"
    general_only = call(f"Bearer {local_service.tokens['general-only']}")  # a key for general data, on pii data
    if endpoint in ("mask", "scan"):  # they use no key: any inspect scope will do
        assert general_only.status_code == 200, general_only.text
    elif endpoint != "metrics":
        assert general_only.status_code == 403 and general_only.json()["error"]["code"] == "ACCESS_DENIED"
    allowed = call(f"Bearer {local_service.tokens['admin']}")
    assert allowed.status_code == 200, allowed.text


def test_health_endpoints_need_no_key(local_service: Service) -> None:
    assert httpx.get(local_service.url + "/healthz").status_code == 200
    assert httpx.get(local_service.url + "/readyz").status_code == 200


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    service = start_local(tmp_path_factory.mktemp("svc-2w"), workers=2)
    yield service
    service.process.stop()


def test_revoked_key_is_refused_by_every_worker_within_5_seconds(two_workers: Service) -> None:
    """Each answer is tied to the worker that gave it (the first 12 characters of the request id
    it made are its process's own prefix). From 5 s after the revocation began, every answer is
    a 401, and 401s came from both workers."""
    store = FileKeyStore(two_workers.home / "apikeys.json")
    token = create_key(store, "short-lived", ["encrypt:*"])
    body = {"classification": "general", "plaintext": "x"}
    fresh = httpx.Limits(max_keepalive_connections=0)  # a new connection per request: both workers answer

    def ask(c: httpx.Client) -> tuple[int, str]:
        r = c.post("/v1/encrypt", json=body)
        return r.status_code, r.headers["x-request-id"][:12]

    with httpx.Client(base_url=two_workers.url, headers={"Authorization": f"Bearer {token}"}, limits=fresh) as c:
        deadline = time.monotonic() + 10  # the workers learn of the new key within their refresh
        workers: set[str] = set()
        while time.monotonic() < deadline and len(workers) < 2:
            status, worker = ask(c)
            if status == 200:
                workers.add(worker)
        assert len(workers) == 2, "both workers should have served the key"
        # What `kmsguard apikey revoke` does, in process: the 5 s are counted from the write itself
        # (a CLI process can take seconds to start on a loaded machine).
        revoked_at = time.monotonic()
        assert store.revoke("short-lived")
        time.sleep(max(0.0, revoked_at + 5 - time.monotonic()))
        after: list[tuple[int, str]] = []
        while {w for s, w in after if s == 401} != workers and len(after) < 200:
            after.append(ask(c))
    assert {w for _, w in after} <= workers, "an answer from a worker not seen before"
    assert [(s, w) for s, w in after if s != 401] == [], "accepted 5 s after the revocation"
    assert {w for _, w in after} == workers, f"401s from one worker only, in {len(after)} answers"


def test_rate_limit_per_key_answers_429_with_retry_after(limited_service: Service) -> None:
    body = {"classification": "general", "plaintext": "x"}
    with limited_service.client("app") as app, limited_service.client("admin") as admin:
        answers = [app.post("/v1/encrypt", json=body) for _ in range(3)]
        assert [r.status_code for r in answers[:2]] == [200, 200]
        r = answers[2]
        assert r.status_code == 429 and r.json()["error"] == {
            "code": "RATE_LIMITED", "message": "this API key's request rate limit is exceeded", "retryable": True,
        }
        assert int(r.headers["retry-after"]) >= 1
        assert admin.post("/v1/encrypt", json=body).status_code == 200  # another key's bucket


def test_auth_none_is_refused_off_loopback(tmp_path: Path) -> None:
    home = tmp_path / "h"
    home.mkdir()
    (home / "kmsguard.toml").write_text('[server]\nauth = "none"\n')
    r = subprocess.run(
        [sys.executable, "-m", "kmsguard", "serve", "--host", "0.0.0.0", "--port", "1"],
        env=base_env(home), capture_output=True, text=True, timeout=60, check=False,
    )
    assert r.returncode == 1
    assert 'server.auth: "none" is allowed only on a loopback address' in r.stderr
    assert "Traceback" not in r.stderr


def test_auth_none_on_loopback_serves_without_keys(tmp_path: Path) -> None:
    service = start_local(tmp_path / "h", server='auth = "none"')
    try:
        r = httpx.post(service.url + "/v1/encrypt", json={"classification": "general", "plaintext": "x"})
        assert r.status_code == 200
    finally:
        service.process.stop()


def test_auth_none_refuses_requests_that_arrive_off_loopback(tmp_path: Path) -> None:
    """create_app under another server (gunicorn bound to 0.0.0.0, say): the [server] host check
    at start cannot see that, so the app refuses by the address each request arrived on
    (ASGI ``scope["server"]``, which httpx's ASGI transport takes from the URL)."""
    home = tmp_path / "h"
    home.mkdir()
    (home / "kmsguard.toml").write_text('[server]\nauth = "none"\n[audit]\nsink = "jsonl"\n')
    LocalKeyring.create(home / KEY_FILE_NAME, ["general"])
    settings = load_settings(base_env(home))
    app = create_app(settings)
    body = {"classification": "general", "plaintext": "x"}

    async def ask(base_url: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=base_url) as c:
            return [await c.post("/v1/encrypt", json=body), await c.get("/metrics"), await c.get("/healthz")]

    async def run() -> dict[str, list[httpx.Response]]:
        async with app.router.lifespan_context(app):
            return {url: await ask(url) for url in ("http://127.0.0.1:8080", "http://[::1]:8080",
                                                    "http://10.1.2.3:8080", "http://kmsguard.internal")}

    answers = asyncio.run(run())
    for url in ("http://127.0.0.1:8080", "http://[::1]:8080"):
        assert [r.status_code for r in answers[url]] == [200, 200, 200], url
    for url in ("http://10.1.2.3:8080", "http://kmsguard.internal"):
        encrypt, metrics, health = answers[url]
        for r in (encrypt, metrics):
            assert r.status_code == 403, (url, r.text)
            assert r.json()["error"] == {
                "code": "ACCESS_DENIED",
                "message": 'auth = "none" serves only requests that arrive on a loopback address; '
                           "serve this address with API keys",
                "retryable": False,
            }
        assert health.status_code == 200  # liveness needs no auth in any mode


def test_apikey_cli_stores_only_hashes(tmp_path: Path) -> None:
    env = base_env(tmp_path)

    def kg(*args: str) -> subprocess.CompletedProcess[str]:
        return kmsguard_cli(env, *args)

    made = kg("apikey", "create", "--name", "billing", "--allow", "encrypt:payment", "--allow", "decrypt:*")
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    assert token.startswith("kgk_") and len(token) == 47
    path = tmp_path / "apikeys.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert token not in path.read_text() and token[4:] not in path.read_text()
    assert kg("apikey", "create", "--name", "billing", "--allow", "encrypt:*").returncode == 1
    assert "OP:CLASS" in kg("apikey", "create", "--name", "x", "--allow", "fly:general").stderr
    listed = kg("apikey", "list")
    assert "billing" in listed.stdout and "encrypt:payment decrypt:*" in listed.stdout and token not in listed.stdout
    assert kg("apikey", "revoke", "billing").returncode == 0
    assert "revoked" in kg("apikey", "list").stdout
    gone = kg("apikey", "revoke", "billing")
    assert gone.returncode == 1 and "no live API key" in gone.stderr


def test_scopes() -> None:
    assert Scope.parse("decrypt:pii").covers("decrypt", "pii")
    assert not Scope.parse("decrypt:pii").covers("decrypt", "payment")
    assert not Scope.parse("decrypt:pii").covers("encrypt", "pii")
    assert Scope.parse("admin:*").covers("rewrap", "payment")
    assert Scope.parse("admin:general").covers("inspect", "general")
    for bad in ("decrypt", "read:pii", "decrypt:PII", "decrypt:"):
        with pytest.raises(InvalidInput):
            Scope.parse(bad)


def test_key_index_lookup_and_reload(tmp_path: Path) -> None:
    store = FileKeyStore(tmp_path / "apikeys.json")
    token = create_key(store, "a", ["encrypt:*"])
    index = KeyIndex(store, refresh=0)
    key = index.lookup(token)
    assert key is not None and key.name == "a"
    assert index.lookup(token + "x") is None and index.lookup(new_token()) is None and index.lookup("") is None
    store.revoke("a")
    index.maybe_reload()
    assert index.lookup(token) is None
    index.flush_last_used()


def test_postgres_key_store(pg_dsn: str) -> None:
    schema = f"kg_keys_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    try:
        store = PostgresKeyStore(pg_dsn, schema)
        token = create_key(store, "replica-app", ["encrypt:general", "decrypt:general"])
        with pytest.raises(InvalidInput):
            create_key(store, "replica-app", ["encrypt:*"])
        index = KeyIndex(store, refresh=0)
        key = index.lookup(token)
        assert key is not None and key.allows("decrypt", "general") and not key.allows("decrypt", "pii")
        index.flush_last_used()
        assert store.load()[0].last_used is not None
        assert store.revoke("replica-app") and not store.revoke("replica-app")
        index.maybe_reload()
        assert index.lookup(token) is None
    finally:
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def test_server_settings_validation() -> None:
    assert ServerSettings.from_section({}, {}) == ServerSettings()
    s = ServerSettings.from_section({"port": 9000, "workers": 2}, {"KMSGUARD_SERVER_PORT": "9100"})
    assert (s.port, s.workers) == (9100, 2)
    assert ServerSettings.from_section({}, {}, port=7000, host=None).port == 7000
    bad = [
        ({"prot": 1}, {}, "server.prot: unknown setting"),
        ({"port": "80"}, {}, "server.port: must be a whole number"),
        ({"port": True}, {}, "server.port"),
        ({"workers": 0}, {}, "server.workers"),
        ({"auth": "basic"}, {}, "server.auth: must be one of"),
        ({"auth": "none", "host": "0.0.0.0"}, {}, "loopback"),
        ({"api_keys": "postgres"}, {}, "server.api_keys_dsn"),
        ({"rate_limit": float("nan")}, {}, "server.rate_limit"),
        ({"metrics_auth": "yes"}, {}, "server.metrics_auth"),
        ({}, {"KMSGUARD_SERVER_WORKERS": "many"}, "KMSGUARD_SERVER_WORKERS: must be a number"),
        ({}, {"KMSGUARD_SERVER_METRICS_AUTH": "maybe"}, "KMSGUARD_SERVER_METRICS_AUTH: must be true or false"),
    ]
    for section, env, message in bad:
        with pytest.raises(ConfigurationError, match=message.replace(".", r"\.")):
            ServerSettings.from_section(section, env)
    assert ServerSettings.from_section({"auth": "none", "host": "::1"}, {}).auth == "none"


def test_service_with_api_keys_in_postgres(tmp_path: Path, pg_dsn: str) -> None:
    """Keys made and revoked with the CLI in PostgreSQL, seen by a running service (as by every replica)."""
    schema = f"kg_keys_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    home = tmp_path / "h"
    home.mkdir()
    (home / "kmsguard.toml").write_text(
        f'[server]\napi_keys = "postgres"\napi_keys_dsn = "{pg_dsn}"\napi_keys_schema = "{schema}"\n'
        '[audit]\nsink = "jsonl"\n'
    )
    LocalKeyring.create(home / KEY_FILE_NAME, ["general", "pii", "payment"])
    env = base_env(home)

    def kg(*args: str) -> subprocess.CompletedProcess[str]:
        return kmsguard_cli(env, *args)

    try:
        made = kg("apikey", "create", "--name", "edge", "--allow", "encrypt:general")
        assert made.returncode == 0, made.stderr
        token = made.stdout.strip()
        assert not (home / "apikeys.json").exists()
        with ServiceProcess(env) as process:
            body = {"classification": "general", "plaintext": "x"}
            headers = {"Authorization": f"Bearer {token}"}
            assert httpx.post(process.url + "/v1/encrypt", json=body, headers=headers).status_code == 200
            assert kg("apikey", "revoke", "edge").returncode == 0
            deadline = time.monotonic() + 5
            while httpx.post(process.url + "/v1/encrypt", json=body, headers=headers).status_code != 401:
                assert time.monotonic() < deadline, "the revoked key was still accepted after 5 s"
                time.sleep(0.1)
    finally:
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def test_postgres_key_store_outage_keeps_the_keys_then_fails_closed(tmp_path: Path, pg_dsn: str) -> None:
    """The service reaches PostgreSQL through a proxy, then the proxy's port turns into a black
    hole (connections queue, nothing answers: each check of the store waits out its connect
    timeout). Requests are still answered at once with the keys last loaded, until those are
    older than the 5 s revocation promise; from then on 503 API_KEYS_UNAVAILABLE, retryable.
    When the database is back, so is the service."""
    schema = f"kg_keys_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    upstream = urlsplit(pg_dsn)
    proxy = TcpProxy((upstream.hostname or "127.0.0.1", upstream.port or 5432))
    proxy.start()
    via_proxy = urlunsplit(upstream._replace(netloc=f"{upstream.username}@127.0.0.1:{proxy.port}"))
    home = tmp_path / "h"
    home.mkdir()
    (home / "kmsguard.toml").write_text(
        f'[server]\napi_keys = "postgres"\napi_keys_dsn = "{via_proxy}"\napi_keys_schema = "{schema}"\n'
        '[audit]\nsink = "jsonl"\n'
    )
    LocalKeyring.create(home / KEY_FILE_NAME, ["general"])
    token = create_key(PostgresKeyStore(pg_dsn, schema), "edge", ["encrypt:general"])
    body = {"classification": "general", "plaintext": "x"}
    black_hole = socket.socket()
    try:
        env = {**base_env(home), "KMSGUARD_LOG_LEVEL": "WARNING"}
        with ServiceProcess(env) as process, httpx.Client(
            base_url=process.url, headers={"Authorization": f"Bearer {token}"}, timeout=30
        ) as c:
            assert c.post("/v1/encrypt", json=body).status_code == 200
            proxy.stop()
            black_hole.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            black_hole.bind(("127.0.0.1", proxy.port))
            black_hole.listen(64)  # never accepted
            cut = time.monotonic()
            answers: list[tuple[float, float, httpx.Response]] = []  # (sent, seconds taken, answer)
            while time.monotonic() - cut < 8:
                sent = time.monotonic()
                answer = c.post("/v1/encrypt", json=body)
                answers.append((sent - cut, time.monotonic() - sent, answer))
                time.sleep(0.05)
            black_hole.close()
            proxy.start()  # the database is back, on the same port
            deadline = time.monotonic() + 15
            while (back := c.post("/v1/encrypt", json=body)).status_code != 200:
                assert time.monotonic() < deadline, f"still {back.status_code} after the database came back"
                time.sleep(0.1)
            log = process.log()
    finally:
        black_hole.close()
        proxy.stop()
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    slow = [(round(at, 1), round(took, 1)) for at, took, _ in answers if took > 2]
    assert slow == [], "a request waited on the key store's check"
    early = [(round(at, 1), r.status_code) for at, _, r in answers if at < 2.5]
    assert len(early) > 5 and all(status == 200 for _, status in early), early
    late = [r for at, _, r in answers if at >= 5.05]
    assert late, "no request was sent after the promise ran out"
    for r in late:
        assert r.status_code == 503, (r.status_code, r.text)
        assert r.json() == {"error": {
            "code": "API_KEYS_UNAVAILABLE",
            "message": "the API key store cannot be reached, so no key can be checked",
            "retryable": True,
        }}
    assert "Traceback" not in log
    assert "ERROR: cannot read the API key store (ConfigurationError); refusing every API key" in log
    assert "WARNING: the API key store answers again" in log
