"""Shared fixtures: an isolated KMSGUARD_HOME with a fresh local keyring per test."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kmsguard import Guard
from kmsguard.keyrings.local import KEY_FILE_NAME, LocalKeyring


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for var in ("KMSGUARD_CONFIG", "KMSGUARD_BACKEND", "KMSGUARD_PASSPHRASE", "KMSGUARD_HOME"):
        monkeypatch.delenv(var, raising=False)
    h = tmp_path / "home"
    monkeypatch.setenv("KMSGUARD_HOME", str(h))
    return h


@pytest.fixture
def keyring(home: Path) -> LocalKeyring:
    return LocalKeyring.create(home / KEY_FILE_NAME, ["general", "pii", "payment"])


@pytest.fixture
def guard(keyring: LocalKeyring, home: Path) -> Iterator[Guard]:
    with Guard.from_env({"KMSGUARD_HOME": str(home)}) as g:
        yield g


@pytest.fixture
def racy() -> Iterator[None]:
    """Switch threads as often as the interpreter can, so that unguarded steps would race."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(interval)
