"""No plaintext, key material, API token or AWS secret in any selftest or smoke output.

Each run encrypts a planted marker instead of random data, and the outputs (table and
JSON, stdout and stderr) are scanned for the marker and for every secret the run had,
in the encodings a leak would take. A control plants one secret in an output and
checks that the scan finds it, so a scan that cannot fail would be noticed.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

import pytest
from click.testing import CliRunner

from kmsguard.cli.main import cli
from kmsguard.keyrings.local import KEY_FILE_NAME
from kmsguard.selftest import crypto, smoke
from kmsguard.server.apikeys import FileKeyStore, create_key
from kmsguard.testing import TEST_SECRET_KEY
from kmsguard.testing.service import ServiceProcess

MARKER = b"PLANTED-PLAINTEXT-7f3a9c1e5b"


def forms(secret: bytes) -> set[str]:
    """The ways a secret could show up in text: as is, hex, base64 (standard and URL-safe, unpadded)."""
    out = {secret.hex(), base64.b64encode(secret).decode().rstrip("="),
           base64.urlsafe_b64encode(secret).decode().rstrip("=")}
    with contextlib.suppress(UnicodeDecodeError):
        out.add(secret.decode())
    return {f for f in out if len(f) >= 8}


def leaks(text: str, secrets: Iterable[bytes]) -> list[str]:
    return sorted({form for secret in secrets for form in forms(secret) if form in text})


def key_material(home: Path) -> list[bytes]:
    """Every master key version and secret the local key file holds (an unencrypted key file)."""
    keys = json.loads((home / KEY_FILE_NAME).read_text())["keys"]
    found = [base64.b64decode(v) for v in keys.pop("@secrets", {}).values()]
    found += [base64.b64decode(v["material"]) for key in keys.values() for v in key["versions"].values()]
    assert len(found) >= 4
    return found


def invoke(*args: str) -> str:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result.output


def test_the_scan_finds_a_planted_secret() -> None:
    secret = os.urandom(32)
    clean = "status check detail\n" + base64.b64encode(os.urandom(32)).decode()
    assert leaks(clean, [secret, MARKER]) == []
    for planted in (base64.b64encode(secret).decode(), secret.hex(), MARKER.decode(),
                    base64.urlsafe_b64encode(MARKER).decode()):
        assert leaks(clean + planted, [secret, MARKER]), planted


def test_selftest_outputs_hold_no_secret(local_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(crypto, "sample", lambda: MARKER)
    outputs = invoke("selftest") + invoke("selftest", "--json") + invoke("selftest", "--strict", "--iterations", "1")
    assert "roundtrip" in outputs and '"kind": "selftest"' in outputs
    secrets = [MARKER, *key_material(local_home)]
    assert leaks(outputs, secrets) == []
    assert leaks(outputs + base64.b64encode(secrets[-1]).decode(), secrets)  # the control, on this very output


def test_smoke_outputs_hold_no_secret(local_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = FileKeyStore(local_home / "apikeys.json")
    token = create_key(store, "app", ["encrypt:*", "decrypt:*"])
    deny = create_key(store, "inspect", ["inspect:*"])
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    monkeypatch.setattr(smoke, "sample", lambda: MARKER.decode())
    with ServiceProcess(env) as service:
        outputs = invoke("smoke", "--url", service.url, "--token", token, "--deny-token", deny)
        outputs += invoke("smoke", "--url", service.url, "--token", token, "--deny-token", deny, "--json")
        outputs += invoke("smoke", "--url", service.url, "--token", "kg_wrong_token", "--json")
    assert '"kind": "smoke"' in outputs and "roundtrip" in outputs
    secrets = [MARKER, token.encode(), deny.encode(), TEST_SECRET_KEY.encode(), *key_material(local_home)]
    assert leaks(outputs, secrets) == []
    assert leaks(outputs + token, secrets) == [token]
