"""What one worker process of the service holds: its Guard (as AsyncGuard), API keys, limits."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from kmsguard import metrics, telemetry
from kmsguard.aio import AsyncGuard
from kmsguard.audit.settings import AuditSettings
from kmsguard.config import Settings
from kmsguard.guard import Guard
from kmsguard.server.apikeys import LAST_USED_SECONDS, REVOCATION_SECONDS, KeyIndex, open_store
from kmsguard.server.observability import watch_key_rotation
from kmsguard.server.ratelimit import TokenBuckets
from kmsguard.server.readiness import Readiness
from kmsguard.server.settings import ServerSettings
from kmsguard.telemetry import NULL_TELEMETRY, Telemetry

log = logging.getLogger("kmsguard.server")


@dataclass
class Service:
    settings: Settings
    server: ServerSettings
    guard: Guard
    aguard: AsyncGuard
    keys: KeyIndex | None  # None with auth = "none"
    buckets: TokenBuckets
    readiness: Readiness
    #: The Guard's metrics (registry, OpenTelemetry): requests, key rotation, self-test results.
    telemetry: Telemetry = NULL_TELEMETRY
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @classmethod
    def build(cls, settings: Settings, server: ServerSettings, guard: Guard | None = None) -> Service:
        guard = guard if guard is not None else Guard.from_settings(settings)
        keys = None
        if server.auth == "api_keys":
            store = open_store(server.api_keys, settings.home, server.api_keys_dsn, server.api_keys_schema)
            keys = KeyIndex(store)
        audit_limit = AuditSettings.of(settings).max_spool_bytes
        return cls(
            settings=settings,
            server=server,
            guard=guard,
            aguard=AsyncGuard(guard),
            keys=keys,
            buckets=TokenBuckets(server.rate_limit, server.rate_burst),
            readiness=Readiness(guard, server.ready_interval, audit_limit),
            telemetry=telemetry.of(guard.observers),
        )

    def exposition(self) -> bytes:
        registry = metrics.of(self.guard.observers)
        return registry.exposition() if registry is not None else b""

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self.keys is not None:
            self._tasks.append(loop.create_task(self._reload_keys(self.keys)))
            self._tasks.append(loop.create_task(self._write_last_used()))
        if self.telemetry is not NULL_TELEMETRY and self.settings.backend == "aws":
            self._tasks.append(loop.create_task(watch_key_rotation(self.settings, self.telemetry)))

    async def stop(self) -> None:
        """After the last request: stop background work, write last-used times, close the Guard (flushing audit)."""
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        loop = asyncio.get_running_loop()
        if self.keys is not None:
            await loop.run_in_executor(None, self._flush_quietly)
        await self.aguard.close()
        await loop.run_in_executor(None, self.guard.close)

    async def _reload_keys(self, keys: KeyIndex) -> None:
        """Every ``keys.refresh`` seconds, the store checked for changed keys on a thread of its own.

        Off the event loop: a query to a PostgreSQL that is down or slow must not hold up
        requests. Its own thread, not the default pool: a reload never queues behind other
        blocking work. A failed check keeps the keys last loaded; ``caller`` refuses them
        once they are older than the revocation promise.
        """
        loop = asyncio.get_running_loop()
        failing = refusing = False
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kmsguard-apikeys")
        try:
            while True:
                await asyncio.sleep(keys.refresh)
                try:
                    await loop.run_in_executor(pool, keys.maybe_reload)
                except Exception as exc:  # the store is down: keep the keys; say so, and again when refusing
                    stale = keys.age() > REVOCATION_SECONDS
                    if not failing or (stale and not refusing):
                        log.log(
                            logging.ERROR if stale else logging.WARNING,
                            "cannot read the API key store (%s); %s", type(exc).__name__,
                            "refusing every API key until it answers" if stale else "serving the keys last loaded",
                        )
                    failing, refusing = True, stale
                    continue
                if failing:
                    log.warning("the API key store answers again")
                failing = refusing = False
        finally:
            pool.shutdown(wait=False)  # a check waiting on its connect timeout must not hold up shutdown

    async def _write_last_used(self) -> None:
        while True:
            await asyncio.sleep(LAST_USED_SECONDS)
            await asyncio.get_running_loop().run_in_executor(None, self._flush_quietly)

    def _flush_quietly(self) -> None:
        assert self.keys is not None
        try:
            self.keys.flush_last_used()
        except Exception as exc:  # last-used times are a convenience; never fail a worker for them
            log.warning("could not record API keys' last use (%s)", type(exc).__name__)
