"""The suite on every supported Python the machine has: ``nox`` (``make test`` runs it).

One session per version, ``tests-3.11``, ``tests-3.12``, ``tests-3.13``: each builds the
sdist and from it a wheel (Cython-compiled, as a user's pip would), installs it
into the session's own venv and runs the whole suite against that install, not against src/.
``tests-pure`` runs the whole suite once more on 3.11 with ``KMSGUARD_PURE=1``: the same
install, with the compiled hot path's modules imported from their Python sources
(kmsguard.pure), so both builds are tested throughout (tests/test_distribution.py, which
tests the sdist and the wheel as files and in fresh venvs, only in the version sessions).
Under ``make test`` the sessions share one sdist, and tests-3.11 and tests-pure one wheel
(see _builds).

nox finds an interpreter as ``python3.X`` on ``PATH``. pyenv's shims answer to that name
only for the versions pyenv has selected (any other exits with "command not found"), so
each installed pyenv version's own ``bin`` goes first on ``PATH``. A version the machine
lacks is reported by nox as ``skipped`` under its session name; it never fails the run,
and never passes silently.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import nox

#: Every version pyproject.toml's classifiers declare.
PYTHONS = ["3.11", "3.12", "3.13"]

ROOT = Path(__file__).parent
nox.options.sessions = ["tests", "tests-pure"]
nox.options.reuse_venv = "yes"  # dependencies stay; the package itself is rebuilt every run
# uv makes the sessions' venvs and installs their dependencies (pip took about 90 CPU-s per
# session, a sixth of a session's test run); compiled to bytecode at install, as pip does, so
# that each process the tests start reads them rather than compiling them again.
nox.options.default_venv_backend = "uv"
os.environ["UV_COMPILE_BYTECODE"] = "1"
nox.options.error_on_missing_interpreters = False  # reported as skipped, by name


def _pyenv_bins() -> list[str]:
    """The ``bin`` of the newest pyenv-installed release of each version in PYTHONS."""
    versions = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    newest: dict[str, tuple[int, Path]] = {}
    for path in versions.glob("3.*") if versions.is_dir() else ():
        release = re.fullmatch(r"(3\.\d+)\.(\d+)", path.name)  # not 3.13.0t, 3.14-dev, ...
        if release is None or release[1] not in PYTHONS:
            continue
        if not (path / "bin" / f"python{release[1]}").exists():
            continue
        patch = int(release[2])
        if release[1] not in newest or patch > newest[release[1]][0]:
            newest[release[1]] = (patch, path / "bin")
    return [str(newest[v][1]) for v in PYTHONS if v in newest]


os.environ["PATH"] = os.pathsep.join([*_pyenv_bins(), os.environ.get("PATH", "")])


@contextmanager
def _lock(name: str) -> Iterator[None]:
    """An exclusive lock on ``.nox/<name>.lock``, shared by the sessions running in parallel."""
    lock = ROOT / ".nox" / f"{name}.lock"
    lock.parent.mkdir(exist_ok=True)
    with lock.open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _builds(session: nox.Session) -> Path:
    """Where this session's sdist and wheels are built: the run's when ``make test`` names one.

    ``make test`` sets ``KMSGUARD_NOX_RUN`` once for its sessions: they then build one
    sdist, and one wheel per interpreter (tests-3.11 and tests-pure install the same
    one), in ``.nox/builds/<run>``; a previous run's builds are removed. Without it (one
    session run by hand) the session builds its own, afresh.
    """
    run = os.environ.get("KMSGUARD_NOX_RUN")
    if not run:
        private = Path(session.create_tmp()) / "build"
        shutil.rmtree(private, ignore_errors=True)
        private.mkdir()
        return private
    builds = ROOT / ".nox" / "builds"
    with _lock("build"):
        if not (builds / run).is_dir():
            shutil.rmtree(builds, ignore_errors=True)
            (builds / run).mkdir(parents=True)
    return builds / run


def _install_wheel(session: nox.Session) -> Path:
    """Build the sdist, a wheel from it, and install the wheel (with the test extra); the dist directory.

    The dist directory holds that sdist and that wheel (and nothing else), for
    tests/test_distribution.py.
    """
    builds = _builds(session)
    session.install("build", "pip")  # before the test extra (build is in it too): the sdist comes first
    # Building the sdist writes into the tree (Cython's .c files, the egg-info): one session at a time.
    with _lock("build"):
        if not any(builds.glob("*.tar.gz")):
            session.run("python", "-m", "build", "--sdist", "--outdir", str(builds), str(ROOT), silent=True)
    (sdist,) = builds.glob("*.tar.gz")
    tag = session.run("python", "-c", "import sys; print(sys.implementation.cache_tag)", silent=True)
    wheels = builds / str(tag).strip()
    # From the sdist, unpacked in a directory of pip's own: sessions of different versions
    # compile at the same time. Not from pip's cache, which keys a wheel built from an sdist
    # by its path alone.
    with _lock(f"wheel-{wheels.name}"):
        if not any(wheels.glob("*.whl")):
            session.run("python", "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-cache-dir", "--wheel-dir",
                        str(wheels), str(sdist))
    (wheel,) = wheels.glob("*.whl")
    dist = Path(session.create_tmp()) / "dist"
    shutil.rmtree(dist, ignore_errors=True)
    dist.mkdir()
    for built in (sdist, wheel):
        shutil.copy2(built, dist)
    session.install(f"{dist / wheel.name}[test]")
    session.install("--no-deps", "--force-reinstall", str(dist / wheel.name))
    return dist


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """Build and install the wheel for this Python, then run the whole suite on it."""
    dist = _install_wheel(session)
    # From the root, so pytest finds its configuration; src/ is not on sys.path (pytest puts
    # tests/ there), so the suite imports the installed wheel. tests/test_distribution.py
    # installs this same sdist and wheel into fresh venvs.
    session.run("pytest", *session.posargs, env={"KMSGUARD_TEST_DIST": str(dist)})


@nox.session(python=PYTHONS[0], name="tests-pure")
def tests_pure(session: nox.Session) -> None:
    """The whole suite on the plain-Python build of the hot path (KMSGUARD_PURE=1), packaging aside.

    tests/test_distribution.py is left out: it tests the sdist and the wheel themselves,
    which are tests-3.11's (the same files), whatever the running process imports.
    """
    _install_wheel(session)
    session.run("pytest", "--ignore=tests/test_distribution.py", *session.posargs, env={"KMSGUARD_PURE": "1"})
