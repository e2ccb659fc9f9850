"""Every CLI command under every failure the fault proxy offers: one stderr line, the right code, exit 1.

Issue 15, item 5. The commands run through ``cli_driver.py``: one driver process imports
kmsguard, botocore and the CLI once and forks a child per (mode, command), which runs
``python -m kmsguard`` as ``-m`` does and exits as the interpreter does but for module
teardown; what is checked is the bytes on its fds 1 and 2 and its exit status, as a user
sees them. ``EXEC`` cases start a fresh interpreter, so start-up and exit are covered
whole too, in modes where KMS refuses or hangs (calls are still in flight when the
command ends). Each failure mode has a proxy of its own in front of the one moto server.

Every command of ``kmsguard.cli.main.COMMANDS`` (and every subcommand of its groups) has
a case here; a command added without one fails :func:`test_every_command_has_a_fault_case`.
Commands that need no KMS call must do what they do without KMS (obtaining the audit
trail's key is its deliverer's affair): they run in the network failures only, where
``selftest`` and ``serve`` also deliver their audit records from a process, as by default;
elsewhere ``selftest`` delivers from a thread, like every other command.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import click
import pytest

from kmsguard import envelope, fields
from kmsguard.cli.main import COMMANDS, cli
from kmsguard.config import load_settings
from kmsguard.guard import Guard
from kmsguard.testing import KmsRegion, MotoServer

DRIVER = Path(__file__).with_name("cli_driver.py")

#: Failure mode -> (how the proxy makes it, the error code every KMS-bound command reports).
#: Every failure the proxy offers; its ``latency`` is not one (past the deadline, it is "silent").
MODES: dict[str, tuple[Callable[[KmsRegion], object], str]] = {
    "refused": (lambda r: r.proxy.outage("refuse"), "KMS_SERVICE_ERROR"),  # "could not connect to the endpoint"
    "blackholed": (lambda r: r.proxy.outage("blackhole"), "KMS_TIMEOUT"),
    "silent": (lambda r: r.proxy.outage("silent"), "KMS_TIMEOUT"),
    "throttled": (lambda r: r.proxy.throttle(), "RATE_LIMITED"),
    "access-denied": (lambda r: r.proxy.inject("AccessDeniedException"), "ACCESS_DENIED"),
    "disabled": (lambda r: r.proxy.inject("DisabledException"), "KEY_DISABLED"),
    "not-found": (lambda r: r.proxy.inject("NotFoundException"), "KEY_NOT_FOUND"),
    "invalid-state": (lambda r: r.proxy.inject("KMSInvalidStateException"), "KEY_DISABLED"),
    "server-error": (lambda r: r.proxy.server_error(500), "KMS_SERVICE_ERROR"),
    "reset": (lambda r: r.proxy.reset(), "KMS_SERVICE_ERROR"),
    "stall": (lambda r: r.proxy.stall(120), "KMS_TIMEOUT"),
}
#: The modes where a KMS call waits for the deadline, and the commands that wait for several in turn.
SLOW_MODES = ("blackholed", "silent", "throttled", "stall")
SLOW = ("selftest", "keys status", "keys status --strict")
#: Where the commands that make no KMS call are also run.
NETWORK_FAILURES = ("refused", "blackholed")


class Case(NamedTuple):
    """A command line, its stdin (a key of the test's inputs, or ""), and what it must do.

    ``expect``, with the mode's CODE: "error" (exit 1, one line ``error: CODE: ...``);
    "records" (exit 1, one line counting the failed records, each record's error on stdout
    with CODE); "value" (rewrap, migrate: exit 1, one line ``failed: KEY: CODE`` for the one
    value); "not-ready" (exit 1, one line ``not ready: CLASS (CODE), ...``); "report" and
    "failed-report" (exit 0 or 1, nothing on stderr, CODE in the report on stdout).
    Commands that make no KMS call, whatever KMS does: "quiet" (exit 0, nothing on stderr),
    "local-only" (exit 1, one line ``error: CONFIGURATION_ERROR: ...``), "invalid-input"
    (exit 1, one line ``error: INVALID_INPUT: ...``), "smoke" (exit 1 with its report: no
    service there), "serves" (up until SIGTERM, uvicorn's own lines only).
    """

    argv: list[str]
    stdin: str
    expect: str


CASES: dict[str, Case] = {
    "encrypt": Case(["encrypt", "--class", "pii", "-c", "user=7"], "", "error"),
    "encrypt --stream": Case(["encrypt", "--class", "pii", "-c", "user=7", "--stream"], "", "error"),
    "encrypt --jsonl": Case(["encrypt", "--class", "pii", "-c", "user=7", "--jsonl"], "plain.jsonl", "records"),
    "decrypt": Case(["decrypt", "-c", "user=7"], "token", "error"),
    "decrypt --jsonl": Case(["decrypt", "-c", "user=7", "--jsonl"], "token.jsonl", "records"),
    "cat": Case(["cat", "--in", "{stream}", "-c", "user=7"], "", "error"),
    "protect": Case(["protect", "--field", "$.name=pii", "-c", "user=7"], "document", "error"),
    "protect --jsonl": Case(["protect", "--field", "$.name=pii", "-c", "user=7", "--jsonl"], "document", "records"),
    "unprotect": Case(["unprotect", "-c", "user=7"], "protected", "error"),
    "keys status": Case(["keys", "status"], "", "report"),
    "keys status --strict": Case(["keys", "status", "--strict"], "", "not-ready"),
    "keys create": Case(["keys", "create", "--class", "general", "--alias", "alias/fault-{mode}"], "", "error"),
    "keys rotate": Case(["keys", "rotate", "--class", "general"], "", "error"),
    "keys enable-rotation": Case(["keys", "enable-rotation", "--class", "general"], "", "error"),
    "keys retire": Case(
        ["keys", "retire", "--key", "arn:aws:kms:us-east-1:123456789012:key/0000-fault", "--force"], "", "error"
    ),
    "rewrap": Case(["rewrap", "dir:{root}/envelopes", "--progress", "none"], "", "value"),
    "migrate": Case(["migrate", "dir:{root}/plain", "--class", "general", "--progress", "none"], "", "value"),
    "audit verify": Case(["audit", "verify"], "", "error"),
    "selftest": Case(["selftest", "--class", "general"], "", "failed-report"),
    # No KMS call:
    "init": Case(["init"], "", "quiet"),
    "inspect": Case(["inspect"], "token", "quiet"),
    "mask": Case(["mask", "--field", "$.name=erase"], "document", "quiet"),
    "census": Case(["census", "dir:{root}/envelopes"], "", "quiet"),
    "scan": Case(["scan", "{inputs}/document"], "", "quiet"),
    "audit tail": Case(["audit", "tail"], "", "quiet"),
    "audit query": Case(["audit", "query"], "", "quiet"),
    "metrics": Case(["metrics"], "", "quiet"),
    "apikey create": Case(["apikey", "create", "--name", "ops", "--allow", "encrypt:*"], "", "quiet"),
    "apikey list": Case(["apikey", "list"], "", "quiet"),
    "apikey revoke": Case(["apikey", "revoke", "nobody"], "", "invalid-input"),
    "monitoring prometheus-rules": Case(["monitoring", "prometheus-rules"], "", "quiet"),
    "monitoring grafana-dashboard": Case(["monitoring", "grafana-dashboard"], "", "quiet"),
    "monitoring cloudwatch apply": Case(["monitoring", "cloudwatch", "apply", "--dry-run"], "", "quiet"),
    "smoke": Case(["smoke", "--url", "http://127.0.0.1:1", "--token", "t", "--timeout", "1"], "", "smoke"),
    "serve": Case(["serve", "--port", "0"], "", "serves"),
    "keys list": Case(["keys", "list"], "", "local-only"),
    "keys disable": Case(["keys", "disable", "--class", "general", "--version", "1"], "", "local-only"),
    "keys enable": Case(["keys", "enable", "--class", "general", "--version", "1"], "", "local-only"),
    "keys min-decrypt-version": Case(
        ["keys", "min-decrypt-version", "--class", "general", "--version", "1"], "", "local-only"
    ),
}
KMS_EXPECTATIONS = ("error", "records", "value", "not-ready", "report", "failed-report")
#: (mode, case) run as a fresh ``python -m kmsguard`` process: the start-up and exit paths whole.
EXEC = {("refused", "encrypt"), ("blackholed", "decrypt"), ("silent", "unprotect")}
#: The clients whose botocore data the driver parses once for all its children.
BOTOCORE = ["kms", "sts"]
#: Every module a command loads, imported once by the driver before it forks.
PRELOAD = [
    "kmsguard.cli.main",
    *sorted({f"kmsguard.cli.{module}" for module, _ in COMMANDS.values()}),
    "kmsguard.guard",
    "kmsguard.stack",
    "kmsguard.aws",
    "kmsguard.aws.admin",
    "kmsguard.keyrings.aws_kms",
    "kmsguard.keyrings.multi_region",
    "kmsguard.metrics",
    "kmsguard.audit",
    "kmsguard.audit.sqlite",
    "kmsguard.rotation.census",
    "kmsguard.rotation.retire",
    "encodings.idna",
    "boto3",
    "botocore.session",
    "kmsguard.server.app",
    "kmsguard.server.run",
    "kmsguard.selftest.runner",
    "kmsguard.selftest.render",
    "kmsguard.rotation.rewrap",
    "kmsguard.rotation.migrate",
    "kmsguard.audit.verify",
    "rich.table",
    "rich.console",
]


def command_paths(group: click.Group = cli, prefix: tuple[str, ...] = ()) -> set[str]:
    """Every command a user can run: ``COMMANDS`` and, for a group, its subcommands (recursively)."""
    ctx = click.Context(group)
    paths = set()
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        assert command is not None
        if isinstance(command, click.Group):
            paths |= command_paths(command, (*prefix, name))
        else:
            paths.add(" ".join((*prefix, name)))
    return paths


def command_path(argv: list[str]) -> str:
    """The command an argv runs ("keys status" for ``keys status --strict``)."""
    command: click.Command = cli
    names = []
    for word in argv:
        if not isinstance(command, click.Group):
            break
        sub = command.get_command(click.Context(command), word)
        assert sub is not None, f"{word!r} is not a command"
        command = sub
        names.append(word)
    return " ".join(names)


def test_every_command_has_a_fault_case() -> None:
    assert command_paths() - {command_path(c.argv) for c in CASES.values()} == set()


def config_file(path: Path, deadline: float = 4) -> Path:
    """A short deadline (the default) keeps the modes that hang until it quick. The modes KMS
    answers get a long one: their commands fail on the answer, and under make test's load a
    forked child can take seconds to reach its first call."""
    path.write_text(
        f'backend = "aws"\n[aws]\noperation_timeout = {deadline}\nconnect_timeout = 1\nread_timeout = 1\n'
        "max_attempts = 2\n"
    )
    return path


@pytest.fixture
def proxies(kms_server: MotoServer) -> Iterator[dict[str, KmsRegion]]:
    """One proxy per failure mode, all in front of the session's moto server (one key store)."""
    regions = {mode: KmsRegion.start("us-east-1", kms_server) for mode in MODES}
    yield regions
    for region in regions.values():
        region.close()


def make_inputs(directory: Path) -> dict[str, str]:
    """The inputs the commands read, made with the keys while KMS still answers: file paths by name."""
    directory.mkdir()
    ctx = {"user": "7"}
    document = {"name": "Ada Lovelace", "id": 7}
    g = Guard.from_settings(load_settings())
    try:
        token = envelope.to_text(g.encrypt(b"secret", "pii", ctx))
        with (directory / "stream").open("wb") as sink:
            g.encrypt_stream(iter([b"x" * 10_000]), sink, "pii", ctx)
        texts = {
            "token": token,
            "token.jsonl": json.dumps({"id": 1, "token": token}) + "\n",
            "plain.jsonl": json.dumps({"id": 1, "data": "secret"}) + "\n",
            "document": json.dumps(document),
            "protected": json.dumps(fields.protect(g, document, {"$.name": "pii"}, ctx)),
        }
    finally:
        g.close()
    for name, text in texts.items():
        (directory / name).write_text(text)
    return {name: str(directory / name) for name in [*texts, "stream"]}


def run_driver(cases: list[dict[str, Any]], scratch: Path) -> dict[str, dict[str, Any]]:
    """Every case through cli_driver.py; its process group is killed afterwards, so no child outlives the test."""
    spec, out = scratch / "spec.json", scratch / "results.json"
    spec.write_text(json.dumps({"preload": PRELOAD, "botocore_services": BOTOCORE, "parallel": 12, "cases": cases}))
    driver = subprocess.Popen(
        [sys.executable, str(DRIVER), str(spec), str(out)],
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        _, err = driver.communicate(timeout=600)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    assert driver.returncode == 0, err.decode()
    return {r["id"]: r for r in json.loads(out.read_text())}


def problem(case: Case, code: str, result: dict[str, Any]) -> str | None:
    """What is wrong with one run, or None."""
    exit_, out, err = result["exit"], result["stdout"], result["stderr"]
    lines = err.splitlines()
    expect = case.expect
    if "Traceback" in err:
        return "a traceback"
    if expect == "error":
        right = exit_ == 1 and len(lines) == 1 and lines[0].startswith(f"error: {code}: ")
    elif expect == "records":
        codes = {json.loads(line)["error"]["code"] for line in out.splitlines()}
        right = exit_ == 1 and lines == ["1 record(s) failed; see their error records"] and codes == {code}
    elif expect == "value":
        right = exit_ == 1 and lines == [f"failed: one: {code}"]
    elif expect == "not-ready":
        classes = ", ".join(f"{c} ({code})" for c in ("general", "payment", "pii"))
        right = exit_ == 1 and lines == [f"not ready: {classes}"]
    elif expect in ("report", "failed-report"):
        right = exit_ == (expect == "failed-report") and not lines and code in out
    elif expect == "quiet":
        right = exit_ == 0 and not lines
    elif expect == "local-only":
        right = exit_ == 1 and len(lines) == 1 and lines[0].startswith("error: CONFIGURATION_ERROR: ")
    elif expect == "invalid-input":
        right = exit_ == 1 and len(lines) == 1 and lines[0].startswith("error: INVALID_INPUT: ")
    elif expect == "smoke":
        right = exit_ == 1 and not lines
    else:  # "serves": up, then stopped by SIGTERM; uvicorn's own start and stop lines only
        right = exit_ in (0, -signal.SIGTERM) and "Application startup complete." in err
        right = right and all(line.startswith("INFO:") for line in lines)
    return None if right else f"exit {exit_}, stderr {err!r}, stdout {out[:300]!r}"


def test_every_command_fails_on_one_line_in_every_failure_mode(
    kmsguard_aws_env: dict[str, str], proxies: dict[str, KmsRegion], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = config_file(tmp_path / "kmsguard.toml")
    answered = config_file(tmp_path / "answered.toml", deadline=60)
    monkeypatch.setenv("KMSGUARD_CONFIG", str(config))
    inputs = make_inputs(tmp_path / "inputs")
    cases = []
    for mode, (fail, _code) in MODES.items():
        fail(proxies[mode])
        root = tmp_path / mode
        (root / "envelopes").mkdir(parents=True)
        (root / "envelopes" / "one").write_bytes(envelope.from_text(Path(inputs["token"]).read_text()))
        (root / "plain").mkdir()
        (root / "plain" / "one").write_text("secret")
        endpoint = proxies[mode].endpoint  # STS too (selftest's credentials check): nothing leaves the machine
        env = {"AWS_ENDPOINT_URL_KMS": endpoint, "AWS_ENDPOINT_URL_STS": endpoint, "KMSGUARD_HOME": str(root / "home"),
               "KMSGUARD_CONFIG": str(config if mode in SLOW_MODES else answered)}
        # {root}: the mode's own files, for the commands that write beside their input
        places = {"root": root, "stream": inputs["stream"], "mode": mode, "inputs": tmp_path / "inputs"}
        for name, case in CASES.items():
            if case.expect not in KMS_EXPECTATIONS and mode not in NETWORK_FAILURES:
                continue
            argv = [a.format(**places) for a in case.argv]
            cases.append(
                {
                    "id": f"{mode} / {name}",
                    "argv": argv,
                    "stdin": inputs[case.stdin] if case.stdin else "",
                    "env": env if mode in NETWORK_FAILURES else {**env, "KMSGUARD_AUDIT_DELIVERY": "thread"},
                    "exec": (mode, name) in EXEC,
                    "stop_when": "Application startup complete." if case.expect == "serves" else None,
                }
            )
    # The longest first (the modes that hang until the deadline, and the commands that wait
    # for several deadlines in turn): the quick ones then fill the gaps.
    cases.sort(key=lambda c: (c["id"].split(" / ")[0] not in SLOW_MODES, c["id"].split(" / ")[1] not in SLOW))
    results = run_driver(cases, tmp_path)
    problems = []
    for case_id, result in sorted(results.items()):
        mode, _, name = case_id.partition(" / ")
        found = problem(CASES[name], MODES[mode][1], result)
        if found:
            problems.append(f"{case_id}: {found}")
    assert len(results) == len(cases)
    assert not problems, "\n".join(problems)
