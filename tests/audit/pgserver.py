"""A throwaway PostgreSQL server for the test run: initdb + pg_ctl in a temporary directory.

The PostgreSQL tests need a real server, and a developer's machine may have PostgreSQL installed without
one running (or without a database the tests may use). So, unless $KMSGUARD_TEST_PG_DSN names a server,
the tests start their own: a new cluster in a temporary directory, listening on 127.0.0.1 only, on a free
port, with trust authentication for the ``postgres`` role, and a database ``test``; it is stopped and the
directory removed when the run ends. Durability settings are off (``fsync``): nothing outlives the run.

initdb and postgres refuse to run as root, and the tests do run as root in CI, so the server programs are
run as the ``postgres`` OS user (or ``nobody``) when the run is root's, which owns the directory. That is
why this is not pytest-postgresql's process fixture: it runs them as the current user, whoever that is.

The server programs are looked for in $KMSGUARD_TEST_PG_BINDIR when set (and only there), else on PATH,
else in the distributions' versioned directories (Debian's /usr/lib/postgresql/<version>/bin, the PGDG
packages' /usr/pgsql-<version>/bin), newest version first.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import random
import re
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path

import psycopg

PROGRAMS = ("initdb", "pg_ctl", "postgres")

INSTALL_HINT = (
    "The PostgreSQL tests need PostgreSQL's server programs ({programs}), and found none {where}. "
    "Install PostgreSQL (Debian/Ubuntu: apt-get install postgresql; Fedora/RHEL: dnf install "
    "postgresql-server; macOS: brew install postgresql), or set KMSGUARD_TEST_PG_DSN to a server the tests "
    "may create schemas in, e.g. postgresql://postgres@127.0.0.1:5432/test."
)


class PostgresUnavailable(Exception):
    """The tests' PostgreSQL server cannot be had; the message says what to install or set."""


def find_bindir(environ: Mapping[str, str] = os.environ) -> Path:
    """The directory holding initdb, pg_ctl and postgres, or PostgresUnavailable saying what to install."""
    if environ.get("KMSGUARD_TEST_PG_BINDIR"):
        candidates = [Path(environ["KMSGUARD_TEST_PG_BINDIR"])]
        where = f"in KMSGUARD_TEST_PG_BINDIR={environ['KMSGUARD_TEST_PG_BINDIR']}"
    else:
        on_path = shutil.which("initdb", path=environ.get("PATH", os.defpath))
        versioned = glob.glob("/usr/lib/postgresql/*/bin") + glob.glob("/usr/pgsql-*/bin")
        candidates = ([Path(on_path).resolve().parent] if on_path else []) + sorted(
            (Path(d) for d in versioned), key=_version, reverse=True
        )
        where = "on PATH or under /usr/lib/postgresql/*/bin or /usr/pgsql-*/bin"
    for bindir in candidates:
        if all(os.access(bindir / p, os.X_OK) for p in PROGRAMS):
            return bindir
    raise PostgresUnavailable(INSTALL_HINT.format(programs=", ".join(PROGRAMS), where=where))


def _version(bindir: Path) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", str(bindir)))


def free_port() -> int:
    """A port free on 127.0.0.1 below the ephemeral range, so no outgoing connection can take it meanwhile."""
    low = 32768
    with contextlib.suppress(OSError, ValueError, IndexError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    rng = random.Random()  # not secrets: a port number, chosen only to avoid other runs' ports
    for _ in range(100):
        port = rng.randrange(max(1024, low - 10000), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise PostgresUnavailable(f"no free port on 127.0.0.1 below {low} for the tests' PostgreSQL server")


class ThrowawayPostgres:
    """One PostgreSQL server of the test run's own. Its DSN is known before it starts, so that the tests'
    module constants can name it; :meth:`start` brings it up (once), :meth:`stop` removes every trace."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dsn = f"postgresql://postgres@127.0.0.1:{self.port}/test"
        self.dir: Path | None = None
        self._bindir: Path | None = None
        self._user: pwd.struct_passwd | None = None

    def start(self) -> None:
        """Create the cluster and start the server; PostgresUnavailable (with the server's log) if it fails."""
        self._bindir = find_bindir()
        self._user = _unprivileged_user()
        self.dir = Path(tempfile.mkdtemp(prefix="kmsguard-test-pg-"))
        if self._user is not None:
            os.chown(self.dir, self._user.pw_uid, self._user.pw_gid)
        data, log = self.dir / "data", self.dir / "server.log"
        self._run("initdb", "-D", str(data), "-U", "postgres", "--auth=trust", "--encoding=UTF8", "--locale=C", "-N")
        options = (
            f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        self._run("pg_ctl", "start", "-w", "-t", "60", "-D", str(data), "-l", str(log), "-o", options)
        with psycopg.connect(self.dsn.replace("/test", "/postgres"), autocommit=True) as conn:
            conn.execute("CREATE DATABASE test")

    def stop(self) -> None:
        """Stop the server (if it runs) and delete its directory."""
        if self.dir is None:
            return
        try:
            if (self.dir / "data" / "postmaster.pid").exists():
                self._run("pg_ctl", "stop", "-w", "-t", "60", "-m", "immediate", "-D", str(self.dir / "data"))
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def _run(self, program: str, *args: str) -> None:
        assert self._bindir is not None and self.dir is not None
        user = self._user
        proc = subprocess.run(
            [str(self._bindir / program), *args],
            cwd=self.dir,
            capture_output=True,
            text=True,
            user=user.pw_uid if user else None,
            group=user.pw_gid if user else None,
            extra_groups=[] if user else None,
            env={**os.environ, "LC_ALL": "C", **({"HOME": str(self.dir)} if user else {})},
            check=False,
        )
        if proc.returncode != 0:
            log = self.dir / "server.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise PostgresUnavailable(
                f"could not start the tests' PostgreSQL server: {program} {' '.join(args)} exited "
                f"{proc.returncode}:\n{proc.stdout}{proc.stderr}{tail}"
            )


def _unprivileged_user() -> pwd.struct_passwd | None:
    """Who runs the server programs: None (the current user) unless that is root, which PostgreSQL refuses."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise PostgresUnavailable(
        "the tests run as root, which PostgreSQL refuses, and there is no 'postgres' or 'nobody' user to run "
        "the tests' PostgreSQL server as; create one, or set KMSGUARD_TEST_PG_DSN"
    )
