"""Blind indexes on the local keyring: stable across processes and rotations, separated by name."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kmsguard import Guard
from kmsguard.errors import ConfigurationError, InvalidInput
from kmsguard.keyrings.local import LocalKeyring

COMPUTE = (
    "import sys; from kmsguard import Guard\n"
    "with Guard.from_env() as g: print(g.blind_index(sys.argv[1], 'pii', 'passport_idx', normalize='casefold'))"
)


def index_in_new_process(home: Path, value: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KMSGUARD_")}
    env["KMSGUARD_HOME"] = str(home)
    proc = subprocess.run(
        [sys.executable, "-c", COMPUTE, value], capture_output=True, text=True, env=env, timeout=60, check=True
    )
    return proc.stdout.strip()


def test_same_value_same_index_in_two_processes_and_across_rotation(guard: Guard, home: Path) -> None:
    here = guard.blind_index("L898902C3", "pii", "passport_idx", normalize="casefold")
    assert len(here) == 16 and int(here, 16) >= 0
    first, second = index_in_new_process(home, "l898902c3"), index_in_new_process(home, "L898902C3")
    assert first == second == here
    env = {k: v for k, v in os.environ.items() if not k.startswith("KMSGUARD_")}
    subprocess.run(
        [sys.executable, "-m", "kmsguard", "keys", "rotate", "--class", "pii"],
        env={**env, "KMSGUARD_HOME": str(home)},
        check=True,
        capture_output=True,
        timeout=60,
    )
    assert guard.inspect(guard.encrypt_text("x", "pii")).keys[0]["key_ref"] == "local:pii:v2"  # data moved on
    assert index_in_new_process(home, "L898902C3") == here  # ...but not for the index


def test_classifications_and_names_separate_indexes(guard: Guard) -> None:
    values = {
        guard.blind_index("4111111111111111", "pii", "card_idx"),
        guard.blind_index("4111111111111111", "payment", "card_idx"),
        guard.blind_index("4111111111111111", "payment", "card_idx_v2"),
        guard.blind_index("4111111111111112", "payment", "card_idx"),
    }
    assert len(values) == 4


def test_different_key_files_give_different_indexes(guard: Guard, tmp_path: Path) -> None:
    other = LocalKeyring.create(tmp_path / "other" / "keyring.json", ["general", "pii", "payment"])
    g = Guard(guard.policy, other)
    assert g.blind_index("L898902C3", "pii", "passport_idx") != guard.blind_index("L898902C3", "pii", "passport_idx")


def test_normalizers_match_as_documented(guard: Guard) -> None:
    def idx(value: str, how: object = None) -> str:
        return guard.blind_index(value, "payment", "card_idx", normalize=how)  # type: ignore[arg-type]

    assert idx("4111 1111-1111 1111", "digits") == idx("4111111111111111", "digits") == idx("4111111111111111")
    assert idx("4111 1111-1111 1111") != idx("4111111111111111")
    assert idx("  Anna@Example.COM ", ["strip", "casefold"]) == idx("anna@example.com")
    assert idx("Straße", "casefold") == idx("STRASSE", "casefold")
    assert idx(" x ", "strip") == idx("x") != idx(" x ")


def test_bits_truncate_and_bad_arguments_are_refused(guard: Guard) -> None:
    full = guard.blind_index("v", "pii", "n", bits=256)
    assert len(full) == 64 and guard.blind_index("v", "pii", "n", bits=32) == full[:8]
    for call in (
        lambda: guard.blind_index("v", "pii", "n", bits=60),
        lambda: guard.blind_index("v", "pii", "n", bits=16),
        lambda: guard.blind_index("v", "pii", "bad name"),
        lambda: guard.blind_index("v", "pii", "n", normalize="rot13"),
        lambda: guard.blind_index(42, "pii", "n"),  # type: ignore[arg-type]
    ):
        with pytest.raises(InvalidInput):
            call()


def test_a_kms_keyring_needs_a_home_for_its_wrapped_index_key(guard: Guard) -> None:
    class KmsLike:  # a keyring with no index_key of its own, as AwsKmsKeyring
        generate = wrap = unwrap = rewrap = guard.keyring.generate

    with pytest.raises(ConfigurationError):
        Guard(guard.policy, KmsLike()).blind_index("v", "pii", "n")  # type: ignore[arg-type]
