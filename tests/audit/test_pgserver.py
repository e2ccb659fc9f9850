"""Where the tests' own PostgreSQL server comes from, and what a machine without PostgreSQL is told."""

from __future__ import annotations

from pathlib import Path

import pytest

from .pgserver import PROGRAMS, PostgresUnavailable, find_bindir


def test_the_bindir_named_by_the_environment_is_used(tmp_path: Path) -> None:
    for program in PROGRAMS:
        (tmp_path / program).write_text("#!/bin/sh\n")
        (tmp_path / program).chmod(0o755)
    assert find_bindir({"KMSGUARD_TEST_PG_BINDIR": str(tmp_path), "PATH": ""}) == tmp_path


def test_without_the_server_programs_the_message_says_what_to_install(tmp_path: Path) -> None:
    (tmp_path / "initdb").write_text("#!/bin/sh\n")  # initdb alone (a client-only install) is not enough
    (tmp_path / "initdb").chmod(0o755)
    with pytest.raises(PostgresUnavailable) as raised:
        find_bindir({"KMSGUARD_TEST_PG_BINDIR": str(tmp_path), "PATH": ""})
    message = str(raised.value)
    assert "apt-get install postgresql" in message
    assert "KMSGUARD_TEST_PG_DSN" in message
    assert str(tmp_path) in message
