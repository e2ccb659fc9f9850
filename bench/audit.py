"""1 KiB encrypts with audit and metrics on (SQLite, PostgreSQL) against off, in the same run.

Throughput is sustained: each timed run ends with the audit writer's flush, so records
still queued when the loop stops are paid for. The deliverer takes records every
``flush_interval`` (0.2 s), so up to that much is still queued when a loop stops; each
loop lasts SECONDS so that this last delivery weighs about as it does in a service that
runs for hours (over one second it cost PostgreSQL ~4 points). Runs alternate between
configurations and the best of ROUNDS is kept (the least disturbed by other processes).
Cache off: every encrypt wraps a fresh data key under the local keyring (a stand-in for
a KMS call that costs ~25 us instead of milliseconds). Cache on: the data key is reused,
so an encrypt is little more than AES-GCM, and any per-operation work shows the most.

PostgreSQL: $KMSGUARD_BENCH_PG_DSN or $KMSGUARD_TEST_PG_DSN (default the CI server);
the row is left out, saying so, when no server answers.
"""

from __future__ import annotations

import os
import tempfile
import time
import uuid
from dataclasses import replace
from pathlib import Path

from bench.common import table
from kmsguard import Guard
from kmsguard.audit import AuditObserver, build_observer
from kmsguard.audit.chain import AuditKeys, Chain
from kmsguard.audit.deliver import link_batch
from kmsguard.audit.spool import SegmentReader, Spool
from kmsguard.audit.sqlite import SqliteSink
from kmsguard.config import Settings, load_settings
from kmsguard.keyrings.caching import CachingKeyring
from kmsguard.keyrings.local import KEY_FILE_NAME, LocalKeyring
from kmsguard.metrics import Metrics
from kmsguard.operation import Observer
from kmsguard.policy import Policy
from kmsguard.stack import build_observers

SIZE = 1024
SECONDS = 3.0
ROUNDS = 5
BREAKDOWN_ROUNDS = 15
PG_DSN = os.environ.get("KMSGUARD_BENCH_PG_DSN") or os.environ.get(
    "KMSGUARD_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test"
)


def _observers(home: Path, sink: str, schema: str) -> list[Observer]:
    config = f'[audit]\nsink = "{sink}"\n'
    if sink == "postgres":
        config += f'dsn = "{PG_DSN}"\nschema = "{schema}"\n'
    (home / "kmsguard.toml").write_text(config)
    settings = load_settings({"KMSGUARD_HOME": str(home)})
    metrics = Metrics()
    return build_observers(settings, LocalKeyring(home / KEY_FILE_NAME), metrics)


def _rate(guard: Guard, data: bytes) -> tuple[float, float]:
    """Encrypts per second over about SECONDS: as the caller sees it, and sustained (incl. the audit catch-up)."""
    context = {"tenant": "t-42"}
    for _ in range(200):
        guard.encrypt(data, "general", context)
    writers = [o for o in guard.observers if isinstance(o, AuditObserver)]
    for w in writers:
        w.flush()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < SECONDS:
        for _ in range(500):
            guard.encrypt(data, "general", context)
        n += 500
    loop = time.perf_counter() - start
    for w in writers:
        w.flush(timeout=120)
    return n / loop, n / (time.perf_counter() - start)


def _pg_available() -> bool:
    try:
        import psycopg

        psycopg.connect(PG_DSN, connect_timeout=2).close()
        return True
    except Exception:
        return False


def measure() -> list[tuple[str, str, float, float, float]]:
    """(cache, sink, ops/s off, ops/s on as the caller sees it, ops/s on sustained) per configuration."""
    out = []
    sinks = ["sqlite", *(["postgres"] if _pg_available() else [])]
    schema = f"kg_bench_{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        names = ("general", "pii", "payment")
        keyring = LocalKeyring.create(home / KEY_FILE_NAME, names)
        base = Policy.defaults({n: f"local:{n}" for n in names})
        data = os.urandom(SIZE)
        for cache in ("off", "on"):
            reuse = cache == "on"
            policy = base.with_class(
                replace(base.get("general"), cache=replace(base.get("general").cache, reuse=reuse))
            )
            ring = CachingKeyring(keyring, policy)
            for sink in sinks:
                best = {"off": (0.0, 0.0), "on": (0.0, 0.0)}
                for _ in range(ROUNDS):
                    for mode in best:
                        observers = _observers(home, sink, schema) if mode == "on" else []
                        with Guard(policy, ring, observers=observers) as guard:
                            rates = _rate(guard, data)
                        best[mode] = (max(best[mode][0], rates[0]), max(best[mode][1], rates[1]))
                out.append((cache, sink, best["off"][1], best["on"][0], best["on"][1]))
    if "postgres" in sinks:
        import psycopg

        with psycopg.connect(PG_DSN, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    return out


def main() -> None:
    results = measure()
    rows = [
        [cache, sink, f"{off:,.0f}", f"{on:,.0f}", _cost(on, off), f"{sus:,.0f}", _cost(sus, off)]
        for cache, sink, off, on, sus in results
    ]
    print(f"{SIZE} B encrypts per second, audit (non-strict, deliverer process) + metrics off vs on, best of {ROUNDS}:")
    print(table(["data-key cache", "audit sink", "off", "on", "cost", "on, sustained", "cost"], rows))
    print("on: the caller's rate while records spool; sustained: until the sink has every record")
    if not any(r[1] == "postgres" for r in results):
        print(f"(no PostgreSQL at {PG_DSN}: its rows are left out)")
    print()
    rounds = BREAKDOWN_ROUNDS
    print(f"caller-side cost of a {SIZE} B encrypt (no delivery during the run), alternating, best of {rounds}:")
    hit, miss = breakdown(reuse=True), breakdown(reuse=False)
    rows = [
        [name, f"{h:.2f}", _cost(h, hit[0][1], inverse=True), f"{m:.2f}", _cost(m, miss[0][1], inverse=True)]
        for (name, h), (_, m) in zip(hit, miss, strict=True)
    ]
    print(table(["configuration", "us/op, cache hit", "cost", "us/op, cache off", "cost"], rows))
    print()
    print(f"the deliverer's CPU per record, {DELIVERED:,} cache-hit records spooled as hit frames, SQLite sink:")
    one, mixed = deliverer(kinds=1), deliverer(kinds=8)
    rows = [[step, f"{a:.2f}", f"{b:.2f}"] for (step, a), (_, b) in zip(one, mixed, strict=True)]
    print(table(["step", "us/record, one kind", "8 kinds in turn (no runs)"], rows))


DELIVERED = 100_000


def deliverer(kinds: int) -> list[tuple[str, float]]:
    """What each record costs the deliverer: read the spool, link the chain, store the rows.

    This is what bounds the sustained rate: one writer's records reach the sink no faster
    than one core does these steps. ``kinds`` operation kinds (tenants) take turns: with
    one, consecutive hits form runs (one row each); with several in turn, no two
    consecutive records share a kind, and each is a row of its own.
    """
    with tempfile.TemporaryDirectory() as tmp:
        spool = Spool(Path(tmp) / "spool", "w", 1 << 30)
        shapes = [
            ("encrypt", "general", ("local:general:v1",), (), "svc", "ok", None, 0, True, (("tenant", f"t-{k}"),))
            for k in range(kinds)
        ]
        started = int(time.time() * 1e6)
        for i in range(DELIVERED):
            spool.hit(1 + i % kinds, shapes[i % kinds], "0123456789ab", started + i, 2_500, SIZE, i + 1)
        spool.close()
        reader, chain = SegmentReader(Path(tmp) / "spool", "w"), Chain(AuditKeys(os.urandom(32)), "w")
        sink = SqliteSink(Path(tmp) / "audit.db")
        spent = {"read the spool": 0.0, "link (runs of hit frames: a chain MAC each)": 0.0, "store (SQLite)": 0.0}
        while True:
            t0 = time.perf_counter()
            entries, used = reader.read(1 << 20, writer_alive=False)
            t1 = time.perf_counter()
            if not entries:
                break
            records = link_batch(chain, entries)
            t2 = time.perf_counter()
            sink.write(records)
            t3 = time.perf_counter()
            reader.advance(used)
            for step, seconds in zip(spent, (t1 - t0, t2 - t1, t3 - t2), strict=True):
                spent[step] += seconds
        sink.close()
    rows = [(step, seconds / DELIVERED * 1e6) for step, seconds in spent.items()]
    return [*rows, ("in all", sum(us for _, us in rows))]


class Nop:
    """An observer that does nothing: what the observer interface itself costs (see bench/observer.py)."""

    def observe(self, event: object) -> None:
        pass


def quiet_home(home: Path, reuse: bool) -> tuple[Policy, LocalKeyring, Settings]:
    """A home with a local keyring, the default policy (general's data-key cache ``reuse`` as
    given) and an audit writer that never delivers during a run: only the caller's part counts."""
    names = ("general", "pii", "payment")
    keyring = LocalKeyring.create(home / KEY_FILE_NAME, names)
    base = Policy.defaults({n: f"local:{n}" for n in names})
    general = base.get("general")
    policy = base.with_class(replace(general, cache=replace(general.cache, reuse=reuse)))
    (home / "kmsguard.toml").write_text('[audit]\ndelivery = "thread"\nflush_interval = 60\n')
    return policy, keyring, load_settings({"KMSGUARD_HOME": str(home)})


def breakdown(reuse: bool) -> list[tuple[str, float]]:
    """Caller-side microseconds per encrypt: instrumentation, metrics, the audit append.

    The audit writer here never delivers during the run (a one-minute interval), so only
    what the caller's thread pays is measured. Configurations alternate, BREAKDOWN_ROUNDS
    short runs each, and the best run counts, so a burst of load elsewhere on the machine
    does not land on one configuration only.
    """
    with tempfile.TemporaryDirectory() as tmp:
        policy, keyring, settings = quiet_home(Path(tmp), reuse)
        ring = CachingKeyring(keyring, policy)
        data, context = os.urandom(SIZE), {"tenant": "t-42"}
        configs: list[tuple[str, list[Observer]]] = [
            ("no observers (Guard's fast path)", []),
            ("+ an observer that does nothing", [Nop()]),
            ("+ metrics", [Metrics()]),
            ("+ audit append (spool write)", [build_observer(settings, keyring)]),
            ("+ audit append + metrics", [build_observer(settings, keyring), Metrics()]),
        ]
        guards = [(name, Guard(policy, ring, observers=observers)) for name, observers in configs]
        number = 5_000 if reuse else 500
        best = {name: float("inf") for name, _ in configs}
        for guard in (g for _, g in guards):
            for _ in range(200):
                guard.encrypt(data, "general", context)
        for _ in range(BREAKDOWN_ROUNDS):
            for name, guard in guards:
                start = time.perf_counter()
                for _ in range(number):
                    guard.encrypt(data, "general", context)
                best[name] = min(best[name], (time.perf_counter() - start) / number * 1e6)
        for _, guard in guards:
            guard.close()
        return list(best.items())


def _cost(on: float, off: float, inverse: bool = False) -> str:
    """Throughput lost: 1 - on/off for rates; for times per operation (``inverse``), 1 - off/on."""
    return f"{(1 - (off / on if inverse else on / off)) * 100:.0f}%"


if __name__ == "__main__":
    main()
