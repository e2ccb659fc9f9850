"""Every CLI command under every failure the fault proxy offers: one stderr line, the right code, exit 1.

Issue 15, item 5. Each command runs as its own ``python -m kmsguard`` process, as users
run it, several at a time (each failure mode has a proxy of its own in front of the one
moto server). Commands that need no KMS call must succeed and say nothing on stderr
whatever KMS does (obtaining the audit trail's key is its deliverer's affair); they run
in the two network failures only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from kmsguard.testing import KmsRegion, MotoServer

#: Failure mode -> (how the proxy makes it, the error code every KMS-bound command reports).
MODES: dict[str, tuple[Callable[[KmsRegion], object], str]] = {
    "refused": (lambda r: r.proxy.outage("refuse"), "KMS_SERVICE_ERROR"),  # "could not connect to the endpoint"
    "blackholed": (lambda r: r.proxy.outage("blackhole"), "KMS_TIMEOUT"),
    "throttled": (lambda r: r.proxy.throttle(), "RATE_LIMITED"),
    "access-denied": (lambda r: r.proxy.inject("AccessDeniedException"), "ACCESS_DENIED"),
    "disabled": (lambda r: r.proxy.inject("DisabledException"), "KEY_DISABLED"),
    "not-found": (lambda r: r.proxy.inject("NotFoundException"), "KEY_NOT_FOUND"),
    "invalid-state": (lambda r: r.proxy.inject("KMSInvalidStateException"), "KEY_DISABLED"),
}
#: Where the commands that make no KMS call are also run.
NETWORK_FAILURES = ("refused", "blackholed")

#: name -> (argv, stdin: "token", "document", "protected" or "" (b"x"), makes a KMS call)
COMMANDS: dict[str, tuple[list[str], str, bool]] = {
    "encrypt": (["encrypt", "--class", "pii", "-c", "user=7"], "", True),
    "decrypt": (["decrypt", "-c", "user=7"], "token", True),
    "protect": (["protect", "--field", "$.name=pii", "-c", "user=7"], "document", True),
    "unprotect": (["unprotect", "-c", "user=7"], "protected", True),
    "keys rotate": (["keys", "rotate", "--class", "general"], "", True),
    "keys enable-rotation": (["keys", "enable-rotation", "--class", "general"], "", True),
    "keys status --strict": (["keys", "status", "--strict"], "", True),
    "audit verify": (["audit", "verify"], "", True),
    "inspect": (["inspect"], "token", False),
    "mask": (["mask", "--field", "$.name=erase"], "document", False),
    "audit query": (["audit", "query"], "", False),
    "metrics": (["metrics"], "", False),
}


def config_file(path: Path) -> Path:
    # A short deadline keeps the blackholed and throttled modes quick, yet leaves room for a
    # first call's client set-up (botocore loads its service model) on a loaded machine.
    path.write_text(
        'backend = "aws"\n[aws]\noperation_timeout = 4\nconnect_timeout = 1\nread_timeout = 1\nmax_attempts = 2\n'
    )
    return path


def cli(args: list[str], env: dict[str, str], stdin: str = "x") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "kmsguard", *args], input=stdin.encode(), capture_output=True, env=env, timeout=120
    )


def ok(proc: subprocess.CompletedProcess[bytes]) -> str:
    assert proc.returncode == 0 and not proc.stderr, proc.stderr.decode()
    return proc.stdout.decode()


@pytest.fixture
def proxies(kms_server: MotoServer) -> Iterator[dict[str, KmsRegion]]:
    """One proxy per failure mode, all in front of the session's moto server (one key store)."""
    regions = {mode: KmsRegion.start("us-east-1", kms_server) for mode in MODES}
    yield regions
    for region in regions.values():
        region.close()


def test_every_command_fails_on_one_line_in_every_failure_mode(
    kmsguard_aws_env: dict[str, str], proxies: dict[str, KmsRegion], tmp_path: Path
) -> None:
    base = {**os.environ, "KMSGUARD_CONFIG": str(config_file(tmp_path / "kmsguard.toml"))}
    document = json.dumps({"name": "Ada Lovelace", "id": 7})
    inputs = {
        "token": ok(cli(["encrypt", "--class", "pii", "-c", "user=7", "--text"], base, "secret")).strip(),
        "document": document,
        "protected": ok(cli(["protect", "--field", "$.name=pii", "-c", "user=7"], base, document)),
    }
    envs = {}
    for mode, (fail, _code) in MODES.items():
        fail(proxies[mode])
        envs[mode] = {**base, "AWS_ENDPOINT_URL_KMS": proxies[mode].endpoint, "KMSGUARD_HOME": str(tmp_path / mode)}
    runs = [
        (mode, name)
        for mode in MODES
        for name, (_argv, _stdin, kms) in COMMANDS.items()
        if kms or mode in NETWORK_FAILURES
    ]

    def run(mode: str, name: str) -> str | None:
        argv, stdin, kms = COMMANDS[name]
        proc = cli(argv, envs[mode], inputs.get(stdin, "x"))
        err = proc.stderr.decode()
        lines = err.splitlines()
        if kms:
            expected = MODES[mode][1]
            right = proc.returncode == 1 and len(lines) == 1
            right = right and (lines[0].startswith(f"error: {expected}: ") or not lines[0].startswith("error:"))
        else:
            right = proc.returncode == 0 and not lines
        return None if right and "Traceback" not in err else f"{mode} / {name}: exit {proc.returncode}, stderr {err!r}"

    with ThreadPoolExecutor(max_workers=4) as pool:
        problems = [p for p in pool.map(lambda r: run(*r), runs) if p]
    assert not problems, "\n".join(problems)
