"""``kmsguard encrypt/decrypt --jsonl``: streaming records through the real command."""

from __future__ import annotations

import base64
import json
from pathlib import Path

from click.testing import CliRunner

from kmsguard.cli.main import cli
from kmsguard.keyrings.local import LocalKeyring


def run(args: list[str], lines: list[str]) -> tuple[int, list[dict[str, object]], str]:
    result = CliRunner().invoke(cli, args, input="".join(line + "\n" for line in lines))
    out = [json.loads(line) for line in result.stdout.splitlines()]
    return result.exit_code, out, result.stderr


def test_round_trip_with_bad_lines_in_between(keyring: LocalKeyring) -> None:
    binary = bytes(range(256))
    lines = [
        json.dumps({"id": 1, "data": "héllo"}),
        "{not json",
        json.dumps({"id": "b", "data_b64": base64.b64encode(binary).decode()}),
        json.dumps({"id": 3}),
        "",
        json.dumps({"id": 4, "data": "per-record", "context": {"row": "9"}}),
        json.dumps([1, 2]),
    ]
    code, out, err = run(["encrypt", "--class", "pii", "-c", "user=7", "--jsonl"], lines)
    assert code == 1 and "3 record(s) failed" in err
    assert [r["id"] for r in out] == [1, None, "b", 3, 4, None]
    assert [r.get("error", {}).get("code") for r in out] == [
        None,
        "INVALID_INPUT",
        None,
        "INVALID_INPUT",
        None,
        "INVALID_INPUT",
    ]
    assert out[1]["line"] == 2 and "not json" not in json.dumps(out[1])

    tokens = [json.dumps({"id": r["id"], "token": r["token"]}) for r in out if "token" in r]
    code, back, _ = run(["decrypt", "-c", "user=7", "--jsonl"], [*tokens, json.dumps({"id": 9, "token": "kg1:AAAA"})])
    assert code == 1
    assert back[0] == {"id": 1, "data": "héllo"}
    assert back[1] == {"id": "b", "data_b64": base64.b64encode(binary).decode()}
    assert back[2] == {"id": 4, "data": "per-record"}
    assert back[3]["error"]["code"] == "INVALID_CIPHERTEXT"  # type: ignore[index]


def test_all_good_exits_zero_and_files_work(keyring: LocalKeyring, tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"id": i, "data": f"v{i}"}) + "\n" for i in range(1200)))
    sealed = tmp_path / "sealed.jsonl"
    result = CliRunner().invoke(
        cli, ["encrypt", "--class", "general", "--jsonl", "--in", str(source), "--out", str(sealed)]
    )
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in sealed.read_text().splitlines()]
    assert [r["id"] for r in records] == list(range(1200))
    code, back, _ = run(["decrypt", "--jsonl"], [json.dumps(r) for r in records])
    assert code == 0 and [r["data"] for r in back] == [f"v{i}" for i in range(1200)]
