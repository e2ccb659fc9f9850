"""The suite on every supported Python the machine has: ``nox`` (``make test`` runs it).

One session per version, ``tests-3.11``, ``tests-3.12``, ``tests-3.13``: each builds the
sdist and from it a wheel (Cython-compiled, as a user's pip would), installs it
into the session's own venv and runs pytest against that install, not against src/.
``tests-pure`` runs the library's own tests once more on 3.11 with ``KMSGUARD_PURE=1``:
the same install, with the compiled hot path's modules imported from their Python sources
(kmsguard.pure), so both builds are tested where the compiled modules are used (the
top-level tests and the audit trail's hit recording; the AWS, service, rotation,
monitoring and self-test suites run on the compiled build only, to keep ``make test``
within its time budget on two cores).

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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import nox

#: Every version pyproject.toml's classifiers declare.
PYTHONS = ["3.11", "3.12", "3.13"]

ROOT = Path(__file__).parent
nox.options.sessions = ["tests", "tests-pure"]
nox.options.reuse_venv = "yes"  # dependencies stay; the package itself is rebuilt every run
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
def _build_lock() -> Iterator[None]:
    """Sessions run in parallel (``make test``); building the sdist writes into the tree
    (Cython's .c files, the egg-info), so one session does it at a time."""
    lock = ROOT / ".nox" / "build.lock"
    lock.parent.mkdir(exist_ok=True)
    with lock.open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _install_wheel(session: nox.Session) -> Path:
    """Build the sdist, a wheel from it, and install the wheel (with the test extra); the dist directory."""
    dist = Path(session.create_tmp()) / "dist"
    for old in dist.glob("*"):
        old.unlink()
    session.install("build")  # before the test extra (which has it too): the sdist comes first
    with _build_lock():
        session.run("python", "-m", "build", "--sdist", "--outdir", str(dist), str(ROOT), silent=True)
    (sdist,) = dist.glob("*.tar.gz")
    # From the sdist, unpacked in a directory of pip's own: sessions compile at the same time.
    # Not from pip's cache, which keys a wheel built from an sdist by its path alone.
    session.run("python", "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-cache-dir", "--wheel-dir", str(dist),
                str(sdist))
    (wheel,) = dist.glob("*.whl")
    session.install(f"{wheel}[test]")
    session.install("--no-deps", "--force-reinstall", str(wheel))
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
    """The library's tests on the plain-Python build of the hot path (KMSGUARD_PURE=1), packaging aside."""
    _install_wheel(session)
    selected = session.posargs or [*PURE_TESTS, "--ignore=tests/test_distribution.py"]
    session.run("pytest", *selected, env={"KMSGUARD_PURE": "1"})


#: What tests-pure runs: every test of Guard, plans, the cache, nonces, envelopes, streams,
#: observers and metrics (tests/*.py), and the audit trail's compiled hit recording.
PURE_TESTS = [
    *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")),
    "tests/audit/test_hits.py",
    "tests/audit/test_observer.py",
    "tests/audit/test_request_ids.py",
    "tests/audit/test_formats.py",
]
