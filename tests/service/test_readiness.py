"""Readiness: a cached answer, and one probe at a time however many probes arrive."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

from kmsguard import Guard
from kmsguard.datakey import DataKey
from kmsguard.errors import KeyUnavailable
from kmsguard.keyrings.base import KeyRequest
from kmsguard.keyrings.local import KEY_FILE_NAME, LocalKeyring
from kmsguard.policy import Policy
from kmsguard.server.readiness import PROBE_CONTEXT, Readiness


class SlowKeyring(LocalKeyring):
    """A local keyring whose generate takes a while and can be made to fail; it counts calls."""

    calls = 0
    down = False
    lock = threading.Lock()

    def generate(self, request: KeyRequest) -> DataKey:
        with self.lock:
            self.calls += 1
        assert dict(request.context) == PROBE_CONTEXT
        time.sleep(0.05)
        if self.down:
            raise KeyUnavailable("the key service is down")
        return super().generate(request)


def test_one_probe_at_a_time_and_cached(tmp_path: Path) -> None:
    LocalKeyring.create(tmp_path / KEY_FILE_NAME, ["general", "pii", "payment"])
    keyring = SlowKeyring(tmp_path / KEY_FILE_NAME)
    guard = Guard(Policy.defaults({c: f"local:{c}" for c in ("general", "pii", "payment")}), keyring)
    readiness = Readiness(guard, interval=60, max_spool_bytes=1 << 20)

    async def run() -> None:
        answers = await asyncio.gather(*(readiness.check() for _ in range(20)))
        assert all(a == (True, answers[0][1]) for a in answers)
        assert keyring.calls == 3  # one probe: one data key per classification
        await readiness.check()
        assert keyring.calls == 3  # cached
        keyring.down = True
        readiness.interval = 0  # stale at once
        ready, checks = await readiness.check()
        assert not ready and checks["key:pii"].startswith("KEY_UNAVAILABLE")
        assert checks["config"] == "ok" and checks["audit"] == "ok"

    asyncio.run(run())
