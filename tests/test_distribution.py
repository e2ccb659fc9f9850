"""The distributions as a user gets them: the wheel and the sdist, each in a fresh venv.

The wheel carries the compiled modules with their Python sources (never Cython's
generated C); the sdist builds where a C compiler is and installs as plain Python where
none is. Both must then do what a new user does first: ``kmsguard init``, a round trip.

Under nox (noxfile.py) the session's own sdist and wheel are tested (``KMSGUARD_TEST_DIST``);
run directly, the test builds them first.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
COMPILED = ("kmsguard/fastpath", "kmsguard/nonces", "kmsguard/histogram", "kmsguard/audit/frames")
#: The compiled modules' C declarations (nonces.py needs none of its own).
DECLARATIONS = tuple(m for m in COMPILED if (ROOT / "src" / f"{m}.pxd").exists())


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    given = os.environ.get("KMSGUARD_TEST_DIST")
    if given:
        return Path(given)
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)], check=True, capture_output=True)
    return out


def only(dist: Path, pattern: str) -> Path:
    (found,) = dist.glob(pattern)
    return found


def fresh_venv(where: Path, requirement: Path, env: dict[str, str] | None = None) -> Path:
    """A new venv with ``requirement`` installed by pip, as a user would; its bin directory."""
    subprocess.run([sys.executable, "-m", "venv", str(where)], check=True)
    bin_dir = where / "bin"
    subprocess.run(
        [bin_dir / "python", "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(requirement)],
        check=True,
        env=env,
    )
    return bin_dir


def user_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KMSGUARD_") and k != "PYTHONPATH"}
    return {**env, "KMSGUARD_HOME": str(home)}


def first_steps(bin_dir: Path, home: Path) -> bool:
    """``kmsguard init`` and a round trip through the command line; whether the hot path is compiled."""
    env = user_env(home)
    subprocess.run([bin_dir / "kmsguard", "init"], check=True, env=env, capture_output=True)
    secret = b"4111 1111 1111 1111"
    token = subprocess.run(
        [bin_dir / "kmsguard", "encrypt", "--class", "payment", "--context", "purpose=refund", "--text"],
        input=secret, check=True, env=env, capture_output=True,
    ).stdout
    assert token.startswith(b"kg1:") and secret not in token
    back = subprocess.run(
        [bin_dir / "kmsguard", "decrypt", "--context", "purpose=refund"],
        input=token, check=True, env=env, capture_output=True,
    ).stdout
    assert back == secret
    probe = "import kmsguard.fastpath as f, kmsguard.audit.frames as a; print(f.COMPILED, a.COMPILED)"
    out = subprocess.run([bin_dir / "python", "-c", probe], check=True, env=env, capture_output=True, text=True)
    compiled = set(out.stdout.split())
    assert len(compiled) == 1  # all compiled or none
    return compiled == {"True"}


def test_the_wheel_holds_the_compiled_modules_and_the_sources_but_no_c(dist: Path) -> None:
    names = set(zipfile.ZipFile(only(dist, "*.whl")).namelist())
    assert {f"{m}.pxd" for m in DECLARATIONS} <= names
    for module in COMPILED:
        assert f"{module}.py" in names
        assert any(n.startswith(f"{module}.cpython-") and n.endswith(".so") for n in names), module
    assert "kmsguard/py.typed" in names and "kmsguard/guard.py" in names
    assert not [n for n in names if n.endswith(".c")]


def test_the_sdist_carries_the_declarations_and_the_generated_c(dist: Path) -> None:
    """A build from it needs the .pxd files (the compiled types) and may lack Cython's output otherwise."""
    with tarfile.open(only(dist, "*.tar.gz")) as sdist:
        names = {n.split("/", 1)[1] for n in sdist.getnames() if "/" in n}
    assert {f"src/{m}.pxd" for m in DECLARATIONS} <= names
    for module in COMPILED:
        assert {f"src/{module}.py", f"src/{module}.c"} <= names
    assert {"pyproject.toml", "setup.py"} <= names


def test_the_wheel_installs_into_a_fresh_venv_and_does_a_round_trip(dist: Path, tmp_path: Path) -> None:
    bin_dir = fresh_venv(tmp_path / "venv", only(dist, "*.whl"))
    assert first_steps(bin_dir, tmp_path / "home")


def test_the_sdist_installs_as_plain_python_without_a_compiler(dist: Path, tmp_path: Path) -> None:
    """CC=false: every compile fails, and the optional extensions are left out, not the install.

    Not from pip's cache, which keys a wheel built from an sdist by its path alone (and
    may hold one compiled from this path)."""
    no_compiler = {**os.environ, "CC": "false", "PIP_NO_CACHE_DIR": "1"}
    bin_dir = fresh_venv(tmp_path / "venv", only(dist, "*.tar.gz"), env=no_compiler)
    assert not first_steps(bin_dir, tmp_path / "home")
