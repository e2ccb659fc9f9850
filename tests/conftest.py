"""Shared fixtures: an isolated KMSGUARD_HOME with a fresh local keyring per test."""

from __future__ import annotations

import gc
import os
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kmsguard import Guard
from kmsguard.keyrings.local import KEY_FILE_NAME, LocalKeyring


@pytest.fixture(autouse=True)
def _collect_garbage() -> Iterator[None]:
    """After each test, once its other fixtures are closed, collect garbage.

    Whatever the test left open (a file, a socket, a SQLite connection, a child process
    never waited for) warns now, in its finalizer, and pyproject's filterwarnings make that
    this test's error, rather than that of whichever later test the collector runs in.

    What survives the pass is then frozen (``gc.freeze``), so the next test's pass looks
    only at what was allocated since. Unfrozen, the libraries the tests import as they go
    (botocore's service models, FastAPI, moto's clients) were looked at again after every
    later test: a full pass cost most short tests more CPU than their own work, four
    sessions at a time in ``make test``.
    """
    yield
    gc.collect()
    gc.freeze()


@pytest.fixture(autouse=True, scope="module")
def _collect_module_garbage() -> Iterator[None]:
    """After each module, once its module-scoped fixtures are closed, one full pass.

    What a module's fixtures held was frozen while its tests ran; whatever of it is now
    garbage is collected here, and what it left open warns here.
    """
    yield
    gc.unfreeze()
    gc.collect()
    gc.freeze()


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Hand the frozen objects back to the collector."""
    gc.unfreeze()


@pytest.fixture
def sqlite_connections(monkeypatch: pytest.MonkeyPatch) -> list[sqlite3.Connection]:
    """Every ``sqlite3`` connection opened during the test, in order: to check that code closes them."""
    opened: list[sqlite3.Connection] = []
    connect = sqlite3.connect

    def spied(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        opened.append(connect(*args, **kwargs))
        return opened[-1]

    monkeypatch.setattr(sqlite3, "connect", spied)
    return opened


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


#: In a fresh_python scenario, around a fork that a running Guard's threads make a fork of
#: a multi-threaded process: what the scenario tests is how kmsguard survives a user's such
#: fork, and Python 3.12+ rightly warns that user (nothing else is let through).
FORK_WITH_THREADS = """
import contextlib, warnings
@contextlib.contextmanager
def fork_with_threads():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r".*use of fork\\(\\) may lead to deadlocks", DeprecationWarning)
        yield
"""


@pytest.fixture
def fresh_python() -> Callable[[str], str]:
    """Run a scenario in a new interpreter (``-W error``) and return what it printed.

    Tests fork there, never in pytest's own process: the suite's servers and delivery
    threads would make every fork a fork of a multi-threaded process, which may deadlock
    (and 3.12+ warns of it). The scenario must exit 0 within the timeout: a child that
    hangs fails the test instead of hanging the suite. It imports the tests' helpers as
    pytest does, from tests/ (``from audit.test_spool import fill``).
    """
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}

    def run(code: str) -> str:
        proc = subprocess.run(
            [sys.executable, "-W", "error", "-c", FORK_WITH_THREADS + textwrap.dedent(code)],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    return run
