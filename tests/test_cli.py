"""The kmsguard command end to end, each call a real subprocess with its own KMSGUARD_HOME."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest

from kmsguard import envelope
from kmsguard.cli import main

BINARY = bytes(range(256)) * 3 + b"\r\n\x00\x1a end"


class Cli:
    def __init__(self, home: Path) -> None:
        self.home = home
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("KMSGUARD_")}
        self.env["KMSGUARD_HOME"] = str(home)

    def __call__(self, *args: str, input: bytes = b"", code: int = 0, **env: str) -> subprocess.CompletedProcess[bytes]:
        proc = subprocess.run(
            [sys.executable, "-m", "kmsguard", *args],
            input=input,
            capture_output=True,
            env={**self.env, **env},
            timeout=60,
        )
        assert proc.returncode == code, (proc.returncode, proc.stderr.decode())
        assert b"Traceback" not in proc.stderr
        return proc


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    c = Cli(tmp_path / "home")
    c("init")
    return c


def error_line(proc: subprocess.CompletedProcess[bytes]) -> str:
    lines = proc.stderr.decode().strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_init_creates_home_and_refuses_to_overwrite(tmp_path: Path) -> None:
    c = Cli(tmp_path / "fresh")
    out = c("init").stdout.decode()
    key_file = c.home / "keyring.json"
    assert "keyring.json" in out and "general, payment, pii" in out
    assert (key_file.stat().st_mode & 0o777) == 0o600
    assert (c.home / "kmsguard.toml").exists()
    before = key_file.read_bytes()
    proc = c("init", code=1)
    assert error_line(proc).startswith("error: KEYRING_ERROR: a keyring already exists")
    assert key_file.read_bytes() == before


def test_binary_round_trip_through_stdin_and_stdout(cli: Cli) -> None:
    sealed = cli("encrypt", "--class", "pii", "--context", "passenger=42", input=BINARY).stdout
    assert sealed.startswith(b"KG\x01\x01")
    assert cli("decrypt", "-c", "passenger=42", input=sealed).stdout == BINARY
    assert cli("decrypt", input=sealed).stdout == BINARY


def test_text_round_trip_and_files(cli: Cli, tmp_path: Path) -> None:
    plain = tmp_path / "plain.bin"
    plain.write_bytes(BINARY)
    token_file = tmp_path / "token.txt"
    cli("encrypt", "--class", "general", "--text", "--in", str(plain), "--out", str(token_file))
    token = token_file.read_bytes()
    assert token.startswith(b"kg1:") and token.endswith(b"\n") and token.count(b"\n") == 1
    out = tmp_path / "out.bin"
    cli("decrypt", "--in", str(token_file), "--out", str(out))
    assert out.read_bytes() == BINARY
    assert (out.stat().st_mode & 0o777) == 0o600
    assert cli("decrypt", input=token).stdout == BINARY  # text form on stdin too


def test_inspect_prints_the_header_as_json(cli: Cli) -> None:
    token = cli(
        "encrypt", "--class", "payment", "-c", "purpose=refund", "-c", "booking=ABC123", "--text", input=b"4111"
    ).stdout
    binary = envelope.from_text(token.decode().strip())
    for form in (token, binary):
        info = json.loads(cli("inspect", input=form).stdout)
        assert info == {
            "version": 1,
            "suite": 1,
            "classification": "payment",
            "context": {"booking": "ABC123", "purpose": "refund"},
            "keys": [{"provider": "local", "key_ref": "local:payment:v1"}],
            "size": info["size"],
            "body_size": 4,
        }


def test_operation_errors_exit_1_with_one_error_line(cli: Cli) -> None:
    secret = b"4111111111111111"
    proc = cli("encrypt", "--class", "payment", input=secret, code=1)
    assert error_line(proc).startswith("error: CONTEXT_REQUIRED: ")
    sealed = cli("encrypt", "--class", "payment", "-c", "purpose=refund", input=secret).stdout
    proc = cli("decrypt", "-c", "purpose=chargeback", input=sealed, code=1)
    assert error_line(proc).startswith("error: CONTEXT_MISMATCH: ")
    tampered = sealed[:-1] + bytes([sealed[-1] ^ 1])
    proc = cli("decrypt", "-c", "purpose=refund", input=tampered, code=1)
    assert error_line(proc) == "error: INVALID_CIPHERTEXT: invalid ciphertext"
    assert proc.stdout == b""
    proc = cli("inspect", input=b"not an envelope", code=1)
    assert error_line(proc) == "error: INVALID_CIPHERTEXT: invalid ciphertext"
    proc = cli("encrypt", "--class", "secret-stuff", input=secret, code=1)
    assert error_line(proc).startswith("error: UNKNOWN_CLASSIFICATION: ")
    proc = cli("decrypt", "--in", str(cli.home / "absent"), code=1)
    assert error_line(proc).startswith("error: INVALID_INPUT: cannot read ")


def test_usage_errors_exit_2(cli: Cli) -> None:
    for args in (
        ["encrypt"],
        ["encrypt", "--class", "general", "--context", "novalue"],
        ["encrypt", "--class", "general", "-c", "k=1", "-c", "k=2"],
        ["frobnicate"],
        ["keys", "disable", "--class", "pii", "--version", "0"],
        ["keys", "rotate"],
    ):
        cli(*args, code=2)


def test_keys_rotate_disable_enable(cli: Cli) -> None:
    old = cli("encrypt", "--class", "pii", input=b"P1234567").stdout
    assert "rotated: local:pii:v2 is now primary" in cli("keys", "rotate", "--class", "pii").stdout.decode()
    listed = json.loads(cli("keys", "list", "--json").stdout)
    pii = {v["version"]: v for v in listed if v["name"] == "pii"}
    assert (pii[1]["primary"], pii[2]["primary"], pii[1]["state"]) == (False, True, "enabled")
    assert pii[2]["key_ref"] == "local:pii:v2" and "material" not in json.dumps(listed)
    table = cli("keys", "list").stdout.decode()
    assert "pii" in table and "enabled" in table

    new = cli("encrypt", "--class", "pii", input=b"P7654321").stdout
    assert json.loads(cli("inspect", input=new).stdout)["keys"][0]["key_ref"] == "local:pii:v2"
    assert cli("decrypt", input=old).stdout == b"P1234567"

    proc = cli("keys", "disable", "--class", "pii", "--version", "2", code=1)
    assert error_line(proc).startswith("error: INVALID_INPUT: version 2 is the primary")
    assert "disabled local:pii:v1" in cli("keys", "disable", "--class", "pii", "--version", "1").stdout.decode()
    proc = cli("decrypt", input=old, code=1)
    assert error_line(proc).startswith("error: KEY_DISABLED: ")
    assert cli("decrypt", input=new).stdout == b"P7654321"
    cli("keys", "enable", "--class", "pii", "--version", "1")
    assert cli("decrypt", input=old).stdout == b"P1234567"
    proc = cli("keys", "enable", "--class", "pii", "--version", "9", code=1)
    assert error_line(proc).startswith("error: KEY_NOT_FOUND: ")


def test_keys_create_for_a_classification_added_later(cli: Cli) -> None:
    with open(cli.home / "kmsguard.toml", "a") as fh:
        fh.write('\n[classifications.loyalty]\nrequired_context = ["member"]\n')
    proc = cli("encrypt", "--class", "loyalty", "-c", "member=7", input=b"x", code=1)
    assert error_line(proc).startswith("error: KEY_NOT_FOUND: ")
    assert "created local:loyalty:v1" in cli("keys", "create", "--class", "loyalty").stdout.decode()
    sealed = cli("encrypt", "--class", "loyalty", "-c", "member=7", input=b"1200 points").stdout
    assert cli("decrypt", "-c", "member=7", input=sealed).stdout == b"1200 points"
    proc = cli("keys", "create", "--class", "loyalty", code=1)
    assert error_line(proc).startswith("error: INVALID_INPUT: ")


def test_setup_problems_are_one_line_errors(tmp_path: Path) -> None:
    c = Cli(tmp_path / "empty")
    proc = c("encrypt", "--class", "general", input=b"x", code=1)
    assert error_line(proc).startswith("error: KEYRING_ERROR: no key file") and "kmsguard init" in proc.stderr.decode()
    c.home.mkdir()
    (c.home / "kmsguard.toml").write_text("[classifications.pii.cache]\nmax_age = 'soon'\n")
    proc = c("encrypt", "--class", "general", input=b"x", code=1)
    assert error_line(proc).startswith("error: CONFIGURATION_ERROR: classifications.pii.cache.max_age")


def test_passphrase_through_the_environment(tmp_path: Path) -> None:
    c = Cli(tmp_path / "sealed")
    c("init", KMSGUARD_PASSPHRASE="open sesame")
    sealed = c("encrypt", "--class", "general", input=b"x", KMSGUARD_PASSPHRASE="open sesame").stdout
    proc = c("decrypt", input=sealed, code=1)
    assert "KMSGUARD_PASSPHRASE" in error_line(proc)
    proc = c("decrypt", input=sealed, code=1, KMSGUARD_PASSPHRASE="open sesame!")
    assert error_line(proc).startswith("error: KEYRING_ERROR: wrong passphrase")
    assert c("decrypt", input=sealed, KMSGUARD_PASSPHRASE="open sesame").stdout == b"x"


def test_console_script_and_version(cli: Cli) -> None:
    script = Path(sys.executable).parent / "kmsguard"
    proc = subprocess.run([str(script), "--version"], capture_output=True, env=cli.env, timeout=60)
    assert proc.returncode == 0 and b"kmsguard, version" in proc.stdout
    assert b"encrypt" in cli("--help").stdout


def test_every_command_loads_under_its_name_and_only_its_module_is_imported() -> None:
    """The group loads commands on demand (kmsguard.cli.main.COMMANDS): each name gives the
    command of that name, and running one imports neither the service nor the scanners.
    ``kmsguard apikey`` needs the key store, not the service's application (FastAPI)."""
    ctx = click.Context(main.cli)
    for name in main.cli.list_commands(ctx):
        command = main.cli.get_command(ctx, name)
        assert command is not None and command.name == name
    assert main.cli.get_command(ctx, "nope") is None
    loaded = subprocess.run(
        [sys.executable, "-c", "import json, sys\nfrom kmsguard.cli.main import main\n"
         "try:\n    main(['encrypt', '--help'])\nexcept SystemExit:\n    print(json.dumps(sorted(sys.modules)))\n"
         "import kmsguard.server.apikeys\nprint(json.dumps(sorted(sys.modules)))"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout
    modules, with_apikeys = (set(json.loads(line)) for line in loaded.splitlines()[-2:])
    assert "kmsguard.cli.data" in modules
    assert not {"kmsguard.cli.server", "kmsguard.cli.scan", "kmsguard.detect", "fastapi"} & modules
    assert "kmsguard.server.apikeys" in with_apikeys and "fastapi" not in with_apikeys


def test_init_problems_are_one_line_errors(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    c = Cli(not_a_dir)
    other = tmp_path / "k.toml"
    other.write_text("")
    proc = c("init", code=1, KMSGUARD_CONFIG=str(other))
    assert error_line(proc).startswith("error: KEYRING_ERROR: cannot set up KMSGUARD_HOME")
    c = Cli(tmp_path / "aliases")
    proc = c("init", code=1, KMSGUARD_KEY_PII="alias/booking-pii")
    assert error_line(proc).startswith("error: CONFIGURATION_ERROR: classifications.pii.key")
    assert not c.home.exists()  # nothing written before the check
    out = c("init", KMSGUARD_BACKEND="aws").stdout.decode()
    assert "no local keyring created" in out and not (c.home / "keyring.json").exists()


@pytest.mark.parametrize("verbosity", [(), ("-v",), ("KMSGUARD_LOG_LEVEL=DEBUG",)])
def test_an_unexpected_exception_is_one_line_naming_its_type_only(
    verbosity: tuple[str, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug (here: loading the settings raises) is ``error: INTERNAL_ERROR: <type>``, exit 1,
    never its message (it may quote data); its traceback shows only when asked for, messages
    left out."""
    from click.testing import CliRunner

    import kmsguard.cli.io

    card, ssn = "card 4111 1111 1111 1111", "ssn 078-05-1120"  # data a message may quote

    def broken(*args: object) -> None:
        raise RuntimeError(card) from KeyError(ssn)

    monkeypatch.setattr(kmsguard.cli.io, "load_settings", broken)
    env = dict(v.split("=") for v in verbosity if "=" in v)
    flags = [v for v in verbosity if "=" not in v]
    result = CliRunner().invoke(main.cli, [*flags, "encrypt", "--class", "pii"], input=b"x", env=env)
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert lines[-1] == "error: INTERNAL_ERROR: RuntimeError"
    assert "4111" not in result.stderr and "078-05" not in result.stderr
    if not verbosity:
        assert lines == ["error: INTERNAL_ERROR: RuntimeError"]
    else:
        assert "kmsguard: WARNING: internal error" in lines[0] and "Traceback (most recent call last):" in lines[1]
        assert "builtins.KeyError" in result.stderr and "which led to:" in result.stderr
        assert any(line.strip().startswith("raise RuntimeError(") for line in lines)  # the frame that raised



def test_a_closed_pipe_is_not_an_internal_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """``kmsguard decrypt | head``: the reader going away ends the command as click ends it
    (exit 1, nothing printed), not as a bug."""
    from click.testing import CliRunner

    import kmsguard.cli.io

    def closed(*args: object) -> None:
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    monkeypatch.setattr(kmsguard.cli.io, "load_settings", closed)
    result = CliRunner().invoke(main.cli, ["encrypt", "--class", "pii"], input=b"x")
    assert (result.exit_code, result.stderr) == (1, "")
