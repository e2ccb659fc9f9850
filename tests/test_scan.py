"""``kmsguard scan`` and the field commands end to end, as real subprocesses; no value may leak."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kmsguard.detect import detect_text

CARD = "4012888888881881"
CARD_SPACED = "5555 5555 5555 4444"
EMAIL = "anna.eriksson@example.com"
IBAN = "DE89370400440532013000"
SSN = "536-22-1234"
PHONE = "+46701234567"
PLANTED = [CARD, CARD_SPACED, EMAIL, IBAN, SSN, PHONE, "L898902C3"]


def run(*args: str, home: Path, input: bytes = b"", code: int = 0) -> subprocess.CompletedProcess[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KMSGUARD_")}
    env["KMSGUARD_HOME"] = str(home)
    proc = subprocess.run(
        [sys.executable, "-m", "kmsguard", *args], input=input, capture_output=True, env=env, timeout=120
    )
    assert proc.returncode == code, (proc.returncode, proc.stderr.decode())
    assert b"Traceback" not in proc.stderr
    return proc


def leaks(output: str) -> list[str]:
    """Planted values (or their bare digits) present in ``output``, plus anything detection finds in it."""
    digits_only = "".join(c for c in output if c.isdigit())
    found = [v for v in PLANTED if v in output]
    found += [v for v in PLANTED if sum(c.isdigit() for c in v) >= 9 and "".join(filter(str.isdigit, v)) in digits_only]
    found += [f"{f.kind} at {f.location}" for f in detect_text(output) if not f.protected]
    return found


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "exports"
    (root / "logs" / "old").mkdir(parents=True)
    (root / "booking.json").write_text(
        json.dumps({"booking": "QX7K2P", "pax": [{"email": EMAIL, "passport": "L898902C3"}], "card": CARD})
    )
    (root / "logs" / "app.jsonl").write_text(
        "\n".join(
            [
                json.dumps({"ts": "2024-05-01T10:00:00Z", "msg": "ok", "order": "1000000000000009"}),
                json.dumps({"ts": "2024-05-01T10:00:01Z", "msg": f"refund to {IBAN}"}),
                json.dumps({"ts": "2024-05-01T10:00:02Z", "user": {"phone": PHONE}}),
            ]
        )
        + "\n"
    )
    (root / "customers.csv").write_text(f"id,name,ssn,card\n1,Anna,{SSN},{CARD_SPACED}\n2,Bo,,\n")
    (root / "logs" / "old" / "app.log.gz").write_bytes(gzip.compress(f"INFO paid with {CARD}\n".encode()))
    (root / "logs" / "clean.txt").write_text("nothing to see: 2024-05-01 order 7000000000000006\n")
    (root / "photo.bin").write_bytes(bytes(range(256)) * 8 + CARD.encode())
    os.mkfifo(root / "logs" / "pipe")  # would block a scan that opened it
    return root


def test_scan_tree_reports_findings_counts_and_skips_binary(tree: Path, tmp_path: Path) -> None:
    proc = run("scan", str(tree), "--json", home=tmp_path / "home")
    report = json.loads(proc.stdout)
    assert report["files_scanned"] == 5 and report["binary_skipped"] == 1 and report["unreadable"] == []
    by_file = {(Path(f["file"]).name, f["kind"], f["location"]) for f in report["findings"]}
    assert by_file == {
        ("booking.json", "email", "$.pax[0].email"),
        ("booking.json", "passport", "$.pax[0].passport"),
        ("booking.json", "card", "$.card"),
        ("customers.csv", "ssn", "2:8"),
        ("customers.csv", "card", "2:20"),
        ("app.jsonl", "iban", "line 2 $.msg"),
        ("app.jsonl", "phone", "line 3 $.user.phone"),
        ("app.log.gz", "card", "1:16"),
    }
    assert report["counts"] == {"email": 1, "passport": 1, "card": 3, "ssn": 1, "iban": 1, "phone": 1}
    assert report["failing"] == 0


def test_scan_exit_codes_gate_on_classes(tree: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    run("scan", str(tree), "--fail-on", "payment", home=home, code=1)
    run("scan", str(tree), "--fail-on", "pii,payment", "--json", home=home, code=1)
    run("scan", str(tree / "logs" / "clean.txt"), "--fail-on", "payment,pii", home=home, code=0)
    run("scan", str(tree), "--fail-on", "general", home=home, code=0)
    run("scan", str(tmp_path / "absent"), home=home, code=2)


def test_scan_output_never_holds_a_value(tree: Path, tmp_path: Path) -> None:
    for args in (["--json"], [], ["--fail-on", "payment"]):
        proc = run("scan", str(tree), *args, home=tmp_path / "home", code=1 if "--fail-on" in args else 0)
        for stream in (proc.stdout.decode(), proc.stderr.decode()):
            assert leaks(stream) == []


def test_leak_check_finds_a_planted_value(tree: Path) -> None:
    """The control: the same check does find values where they are."""
    everything = "".join(p.read_text() for p in tree.rglob("*") if p.suffix in (".json", ".jsonl", ".csv"))
    assert set(PLANTED) - {PHONE} <= set(leaks(everything)) and PHONE in json.dumps(everything)
    assert leaks(f"card ending {CARD[-4:]}, full {CARD}") != []


def test_protect_unprotect_mask_commands(tmp_path: Path) -> None:
    home = tmp_path / "home"
    run("init", home=home)
    record = {"booking": "QX7K2P", "card": {"number": CARD}, "pax": [{"email": EMAIL, "age": 41}]}
    doc = json.dumps(record).encode()
    fields = ["--field", "$.card.number=payment", "--field", "$.pax[*].email=pii", "--field", "$.pax[*].age=pii"]
    protected = run("protect", *fields, "-c", "purpose=refund", input=doc, home=home).stdout
    assert leaks(protected.decode()) == []
    assert json.loads(run("unprotect", "-c", "purpose=refund", input=protected, home=home).stdout) == record
    masked = json.loads(
        run("mask", "--field", "$.card.number", "--field", "$.pax[*].email", input=doc, home=home).stdout
    )
    assert masked["card"]["number"] == "************1881" and masked["pax"][0]["email"] == "a***@example.com"
    # JSON lines: a bad line becomes an error record, the rest go through, exit 1.
    lines = doc + b"\nnot json\n" + json.dumps({"card": {"number": CARD}}).encode() + b"\n"
    proc = run("protect", "--field", "$.pax[*].email=pii", "--jsonl", input=lines, home=home, code=1)
    out = [json.loads(line) for line in proc.stdout.splitlines()]
    assert out[0]["pax"][0]["email"].startswith("kg1:")
    assert out[1] == {"line": 2, "error": {"code": "INVALID_INPUT", "message": "not a JSON value", "retryable": False}}
    assert out[2]["error"]["code"] == "INVALID_INPUT" and "$.pax[*].email" in out[2]["error"]["message"]
    assert leaks(proc.stderr.decode() + json.dumps(out[1:])) == []
    # Errors name the path, never the value.
    err = run("protect", "--field", "$.card.number=nosuchclass", input=doc, home=home, code=1).stderr.decode()
    assert "UNKNOWN_CLASSIFICATION" in err and leaks(err) == []
    run("mask", "--field", "$.x", input=b"{}", home=tmp_path / "never-initialised")  # mask needs no key
