"""``/readyz``: is this process fit to take traffic? A cached check with one probe at a time.

Ready means: the configuration loaded (it did, or the process would not be serving),
each classification's key answers (a data key is generated through the backend keyring,
under the cache, so a cached key cannot hide an unreachable KMS), and the audit spool
accepts records. An answer is reused for ``interval`` seconds; while a probe runs,
callers get the previous answer (the first caller waits for the first probe).
"""

from __future__ import annotations

import asyncio
import time

from kmsguard.audit.writer import AuditObserver
from kmsguard.errors import KmsGuardError
from kmsguard.guard import Guard
from kmsguard.keyrings.base import KeyRequest

#: The context of probe data keys, so they are recognisable in CloudTrail.
PROBE_CONTEXT = {"kmsguard:probe": "readyz"}


class Readiness:
    def __init__(self, guard: Guard, interval: float, max_spool_bytes: int) -> None:
        self.guard = guard
        self.interval = interval
        self.max_spool_bytes = max_spool_bytes
        self._lock = asyncio.Lock()
        self._answer: tuple[bool, dict[str, str]] | None = None
        self._at = -1e9

    async def check(self) -> tuple[bool, dict[str, str]]:
        if self._answer is not None and (time.monotonic() - self._at < self.interval or self._lock.locked()):
            return self._answer
        async with self._lock:
            if self._answer is None or time.monotonic() - self._at >= self.interval:
                self._answer = await asyncio.get_running_loop().run_in_executor(None, self.probe)
                self._at = time.monotonic()
            return self._answer

    def probe(self) -> tuple[bool, dict[str, str]]:
        checks = {"config": "ok"}
        keyring = getattr(self.guard.keyring, "inner", self.guard.keyring)  # past the data-key cache
        for cls in self.guard.policy:
            try:
                keyring.generate(KeyRequest(cls.name, cls.key, PROBE_CONTEXT))
                checks[f"key:{cls.name}"] = "ok"
            except KmsGuardError as exc:
                checks[f"key:{cls.name}"] = f"{exc.code}: {exc.message}"
        checks["audit"] = self._audit()
        return all(v == "ok" for v in checks.values()), checks

    def _audit(self) -> str:
        for observer in self.guard.observers:
            if isinstance(observer, AuditObserver) and observer.spool_bytes >= self.max_spool_bytes * 0.9:
                return "AUDIT_UNAVAILABLE: the audit spool is full (is the audit sink down?)"
        return "ok"
