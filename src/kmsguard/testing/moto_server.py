"""moto's server mode as a separate process on loopback: a local KMS (and STS) endpoint.

A real process, not moto's in-process patching: tests then exercise botocore's own
HTTP stack, and an outage is a real dead socket. Starting one is slow (it imports
moto), so a test session starts each server once and shares it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

#: Loopback only: never route the local endpoint through an HTTP proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (bind to 0 and ask the kernel)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class MotoServer:
    """``python -m moto.server`` on 127.0.0.1 and a free port.

    The port is chosen before the child binds it, so another process can take it in
    between; ``start`` then sees the child exit and tries another port.
    """

    def __init__(self, host: str = "127.0.0.1", startup_timeout: float = 60.0) -> None:
        self.host = host
        self.port = 0
        self.startup_timeout = startup_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: Path | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> MotoServer:
        last = "moto server did not start"
        for _ in range(5):
            self.port = free_port(self.host)
            fd, log = tempfile.mkstemp(prefix="kmsguard-moto-", suffix=".log")
            self._log = Path(log)
            with os.fdopen(fd, "wb") as log_file:
                self._proc = subprocess.Popen(
                    [sys.executable, "-m", "moto.server", "-H", self.host, "-p", str(self.port)],
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env={**os.environ, "PYTHONUNBUFFERED": "1"},
                )
            if self._wait_ready():
                return self
            last = self._log.read_text(errors="replace")[-2000:]
            self.stop()
        raise RuntimeError(f"could not start moto server: {last}")

    def _wait_ready(self) -> bool:
        assert self._proc is not None
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False
            try:
                with _OPENER.open(f"{self.url}/moto-api/data.json", timeout=2):
                    return True
            except OSError:
                time.sleep(0.1)
        return False

    def reset(self) -> None:
        """Forget every key and alias (moto's reset API)."""
        req = urllib.request.Request(f"{self.url}/moto-api/reset", method="POST")  # noqa: S310
        with _OPENER.open(req, timeout=10):
            pass

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._log is not None:
            with contextlib.suppress(OSError):
                self._log.unlink()
            self._log = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> MotoServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
