"""Fixtures for the monitoring tests: Prometheus's own tools, which the tests need, not skip without.

``promtool`` and ``prometheus`` come from Debian's ``prometheus`` package; .ci/run installs
it when missing. A developer without it gets a failure that says what to install.
"""

from __future__ import annotations

import shutil

import pytest

INSTALL = "install Debian's prometheus package (apt-get install prometheus; .ci/run does it when missing)"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not on PATH: {INSTALL}", pytrace=False)
    return path


@pytest.fixture(scope="session")
def promtool() -> str:
    return _tool("promtool")


@pytest.fixture(scope="session")
def prometheus_bin() -> str:
    return _tool("prometheus")
