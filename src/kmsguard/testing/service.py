"""``kmsguard serve`` as a real process on a free loopback port, for tests and benchmarks.

The service is started exactly as an operator starts it (the command line, the
environment, uvicorn), and stopped with SIGTERM, as an orchestrator stops it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from kmsguard.testing.moto_server import free_port

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ServiceProcess:
    """``python -m kmsguard serve --port <free> [--workers N]`` with ``env`` (the whole environment)."""

    def __init__(self, env: Mapping[str, str], workers: int = 1, startup_timeout: float = 60.0) -> None:
        self.env = dict(env)
        self.workers = workers
        self.startup_timeout = startup_timeout
        self.host = "127.0.0.1"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> ServiceProcess:
        last = "the service did not start"
        for _ in range(3):
            self.port = free_port(self.host)
            fd, log = tempfile.mkstemp(prefix="kmsguard-serve-", suffix=".log")
            self.log_path = Path(log)
            with os.fdopen(fd, "wb") as log_file:
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", "kmsguard", "serve", "--host", self.host, "--port", str(self.port),
                     "--workers", str(self.workers)],
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env={**self.env, "PYTHONUNBUFFERED": "1"},
                )
            if self._wait_ready():
                return self
            last = self.log()[-3000:]
            self.stop()
        raise RuntimeError(f"kmsguard serve did not start: {last}")

    def _wait_ready(self) -> bool:
        assert self.proc is not None
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with _OPENER.open(f"{self.url}/healthz", timeout=2):
                    return True
            except OSError:
                time.sleep(0.1)
        return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def terminate(self) -> None:
        """SIGTERM, as an orchestrator sends it (the service then shuts down gracefully)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.log_path is not None:
            with contextlib.suppress(OSError):
                self.log_path.unlink()
            self.log_path = None

    def __enter__(self) -> ServiceProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
