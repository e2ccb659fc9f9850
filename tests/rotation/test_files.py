"""Rewrap of a directory of envelope files and of a JSON-lines file: SIGKILL mid-run, restart, no partial file."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

from kmsguard import Guard, envelope

from .conftest import cli, refs, rotate, sealed, start

FILES = 300


def _wait_for(path: Path, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert path.exists()


def test_directory_killed_and_restarted(local_home: Path, tmp_path: Path) -> None:
    data = tmp_path / "vault"
    data.mkdir()
    plain = [f"document {n}" for n in range(FILES)]
    with Guard.from_env({"KMSGUARD_HOME": str(local_home)}) as guard:
        for n, text in enumerate(plain):
            body = guard.encrypt(text.encode(), "general")
            # Half binary files, half kg1: text files.
            (data / f"{n:04d}.kg").write_bytes(body if n % 2 else (envelope.to_text(body) + "\n").encode())
    rotate(local_home, "general")

    proc = start(local_home, "rewrap", f"dir:{data}", "--batch", "10", "--max-rate", "300")
    _wait_for(data / ".kmsguard-journal.json")
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()  # reaped, and its pipes closed
    # Killed mid-run: every file is whole, old or new; none is left half-written.
    moved = 0
    with Guard.from_env({"KMSGUARD_HOME": str(local_home)}) as guard:
        for n, text in enumerate(plain):
            raw = (data / f"{n:04d}.kg").read_bytes()
            assert guard.decrypt(raw.strip() if n % 2 == 0 else raw) == text.encode()
            moved += refs(raw.strip() if n % 2 == 0 else raw) == ("local:general:v2",)
    assert 0 < moved < FILES

    done = cli(local_home, "rewrap", f"dir:{data}", "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    # The run's counts cover both processes; each file was counted once, the files the killed
    # process replaced after its last journal entry as already current.
    assert summary["rows"] == FILES and summary["changed"] + summary["current"] == FILES
    assert summary["changed"] >= FILES - moved
    assert not [p for p in data.iterdir() if p.name.endswith(".kmsguard-tmp")]  # a killed run's temp file is gone
    with Guard.from_env({"KMSGUARD_HOME": str(local_home)}) as guard:
        for n, text in enumerate(plain):
            raw = (data / f"{n:04d}.kg").read_bytes()
            token = raw.strip() if n % 2 == 0 else raw
            assert refs(token) == ("local:general:v2",)
            assert guard.decrypt(token) == text.encode()
            assert (n % 2 == 0) == raw.startswith(b"kg1:")  # each file keeps its form

    again = cli(local_home, "rewrap", f"dir:{data}", "--json")
    assert again.returncode == 0 and json.loads(again.stdout)["changed"] == 0


def test_jsonl_killed_and_restarted(local_home: Path, tmp_path: Path) -> None:
    path = tmp_path / "people.jsonl"
    plain = [f"passport {n}" for n in range(FILES)]
    tokens = sealed(local_home, plain)
    lines = [json.dumps({"id": n, "person": {"passport": t, "name": f"name {n}"}}) for n, t in enumerate(tokens)]
    path.write_text("\n".join(lines) + "\n")
    original = path.read_bytes()
    rotate(local_home)
    url = f"jsonl:{path}?field=$.person.passport"

    dry = cli(local_home, "rewrap", url, "--dry-run", "--json")
    assert json.loads(dry.stdout)["would_change"] == FILES and path.read_bytes() == original

    proc = start(local_home, "rewrap", url, "--batch", "10", "--max-rate", "300")
    _wait_for(tmp_path / ".people.jsonl-journal.json")
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()  # reaped, and its pipes closed
    assert path.read_bytes() == original  # the file is replaced once, at the end: untouched so far

    done = cli(local_home, "rewrap", url, "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["changed"] == FILES
    records = [json.loads(line) for line in path.read_text().splitlines()]
    with Guard.from_env({"KMSGUARD_HOME": str(local_home)}) as guard:
        for n, record in enumerate(records):
            assert record["id"] == n and record["person"]["name"] == f"name {n}"
            assert refs(record["person"]["passport"]) == ("local:pii:v2",)
            assert guard.decrypt_text(record["person"]["passport"]) == plain[n]
    again = cli(local_home, "rewrap", url, "--json")
    assert json.loads(again.stdout)["changed"] == 0


def test_csv_migrate_then_census(local_home: Path, tmp_path: Path) -> None:
    path = tmp_path / "cards.csv"
    path.write_text("id,card,name\n" + "".join(f"{n},4111-{n:04d},n{n}\n" for n in range(50)))
    url = f"csv:{path}?column=card"
    first = cli(local_home, "migrate", url, "--class", "payment", "-c", "purpose=billing", "--context-from", "row=id")
    assert first.returncode == 0, first.stderr
    assert "4111-" not in path.read_text()
    census = json.loads(cli(local_home, "census", url, "--json").stdout)
    assert census["not_envelopes"] == 0 and census["groups"][0]["count"] == 50
    with Guard.from_env({"KMSGUARD_HOME": str(local_home)}) as guard:
        rows = path.read_text().splitlines()[1:]
        n, token, _ = rows[7].split(",")
        assert guard.decrypt_text(token, {"purpose": "billing", "row": n}) == "4111-0007"
    again = cli(
        local_home, "migrate", url, "--class", "payment", "-c", "purpose=billing", "--context-from", "row=id", "--json"
    )
    assert json.loads(again.stdout)["changed"] == 0
