"""Retiring a local key version: refused while a census counts envelopes under it; material erased; KEY_DISABLED."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kmsguard import Guard
from kmsguard.errors import KeyDisabled
from kmsguard.keyrings.local import KEY_FILE_NAME

from .conftest import cli, rotate, sealed


def test_rotation_runbook_ends_with_retire(local_home: Path, tmp_path: Path) -> None:
    old = sealed(local_home, [f"secret {n}" for n in range(40)])
    path = tmp_path / "tokens.jsonl"
    path.write_text("".join(json.dumps({"t": t}) + "\n" for t in old))
    url = f"jsonl:{path}?field=$.t"
    rotate(local_home)

    none_yet = cli(local_home, "keys", "retire", "--class", "pii", "--version", "1")
    assert none_yet.returncode == 1 and "no census is recorded" in none_yet.stderr

    refused = cli(local_home, "keys", "retire", "--class", "pii", "--version", "1", "--source", url)
    assert refused.returncode == 1 and "KEY_IN_USE" in refused.stderr and "40 envelope(s)" in refused.stderr
    assert cli(local_home, "keys", "retire", "--class", "pii", "--version", "2").returncode == 1  # the primary

    assert cli(local_home, "rewrap", url).returncode == 0
    assert cli(local_home, "census", url).returncode == 0  # recorded: no leftovers under v1
    retired = cli(local_home, "keys", "retire", "--class", "pii", "--version", "1")
    assert retired.returncode == 0, retired.stderr

    doc = json.loads((local_home / KEY_FILE_NAME).read_text())
    assert doc["keys"]["pii"]["versions"]["1"]["state"] == "retired"
    assert "material" not in doc["keys"]["pii"]["versions"]["1"]
    listed = json.loads(cli(local_home, "keys", "list", "--json").stdout)
    assert {"name": "pii", "version": 1, "state": "retired"}.items() <= next(
        v for v in listed if v["name"] == "pii" and v["version"] == 1
    ).items()
    with Guard.from_env({"KMSGUARD_HOME": str(local_home)}) as guard:
        with pytest.raises(KeyDisabled, match="retired"):
            guard.decrypt_text(old[0])
        assert guard.decrypt_text(json.loads(path.read_text().splitlines()[0])["t"]) == "secret 0"
    assert cli(local_home, "keys", "enable", "--class", "pii", "--version", "1").returncode == 1


def test_min_decrypt_version_refuses_without_erasing(local_home: Path) -> None:
    old = sealed(local_home, ["s"])[0]
    rotate(local_home)
    assert cli(local_home, "keys", "min-decrypt-version", "--class", "pii", "--version", "2").returncode == 0
    with (
        Guard.from_env({"KMSGUARD_HOME": str(local_home)}) as guard,
        pytest.raises(KeyDisabled, match="minimum decrypt version"),
    ):
        guard.decrypt_text(old)
    assert cli(local_home, "keys", "min-decrypt-version", "--class", "pii", "--version", "3").returncode == 1
    assert cli(local_home, "keys", "min-decrypt-version", "--class", "pii", "--version", "1").returncode == 0
    with Guard.from_env({"KMSGUARD_HOME": str(local_home)}) as guard:
        assert guard.decrypt_text(old) == "s"


def test_force_overrides_the_census(local_home: Path, tmp_path: Path) -> None:
    sealed(local_home, ["s"])
    rotate(local_home)
    out = cli(local_home, "keys", "retire", "--class", "pii", "--version", "1", "--force")
    assert out.returncode == 0, out.stderr
