"""Cache hits recorded as compact hit frames (kmsguard.audit.frames): the same records as the full path.

A cache-hit operation that needs nothing but AES-GCM is spooled as a 56-byte frame
naming a template (what every hit of its kind shares); the deliverer expands it. These
tests check what comes out in the sink, not how it was spooled.
"""

from __future__ import annotations

import importlib.util
import marshal
import mmap
import struct
import threading
import zlib
from pathlib import Path
from types import ModuleType

import pytest

from kmsguard import Guard
from kmsguard.audit import AuditObserver, frames
from kmsguard.audit.facts import Hits
from kmsguard.audit.frames import HIT_FLAG, HIT_PAYLOAD, TEMPLATE, hit_check
from kmsguard.audit.record import RUN_ITEM
from kmsguard.audit.spool import decode
from kmsguard.errors import InvalidCiphertext
from kmsguard.keyrings.local import LocalKeyring
from kmsguard.metrics import Metrics
from kmsguard.operation import acting_as

from .conftest import records_of, verify_home, write_config


def observer_of(guard: Guard) -> AuditObserver:
    return next(o for o in guard.observers if isinstance(o, AuditObserver))


def test_hits_are_recorded_as_the_full_path_records_them(keyring: LocalKeyring, home: Path) -> None:
    write_config(home, {"delivery": "thread"})
    with Guard.from_env({"KMSGUARD_HOME": str(home), "KMSGUARD_PRINCIPAL": "booking-api"}) as guard:
        sealed = [guard.encrypt(b"x" * (i + 1), "pii", {"passenger": "42"}) for i in range(5)]
        opened = [guard.decrypt(s, {"passenger": "42"}) for s in sealed]
        with acting_as("agent-7"):
            for _ in range(3):
                guard.encrypt(b"y", "pii", {"passenger": "42"})
        assert observer_of(guard)._templates, "no operation took the compact path"
    assert opened == [b"x" * (i + 1) for i in range(5)]
    records = records_of(home)[:-1]  # without writer-closed
    assert [r.operation for r in records] == ["encrypt"] * 5 + ["decrypt"] * 5 + ["encrypt"] * 3
    assert [r.cache_hit for r in records] == [False] + [True] * 4 + [False] + [True] * 4 + [True] * 3
    assert [r.size for r in records[:10]] == [1, 2, 3, 4, 5] * 2
    assert [r.principal for r in records] == ["booking-api"] * 10 + ["agent-7"] * 3
    full, hits = records[1], records[2:5]  # the 2nd operation took the full path and taught the lane its kind
    for hit in hits:
        assert (hit.key_refs, hit.context, hit.classification, hit.outcome, hit.error_code) == (
            full.key_refs, full.context, full.classification, "ok", None
        )
    assert len({r.request_id for r in records}) == len(records)
    assert [r.time for r in records] == sorted(r.time for r in records)
    assert all(r.duration_us >= 0 for r in records)
    assert verify_home(home).intact


def test_hits_across_segments_and_deliverer_restarts(keyring: LocalKeyring, home: Path) -> None:
    """Small segments: templates are written again into each one, so a segment reads on its own."""
    # 256 KiB segments; close waits for every record (the default 2 s is not enough under make test's load)
    write_config(home, {"delivery": "thread", "flush_interval": 60, "max_spool_mb": 1, "close_timeout": 300})
    with Guard.from_env({"KMSGUARD_HOME": str(home)}) as guard:
        for i in range(12_000):  # about 3 segments of hit frames, two kinds interleaved
            guard.encrypt(b"x", "general", {"n": str(i % 2)})
        assert observer_of(guard)._spool.segment >= 3
    records = records_of(home)
    assert len(records) == 12_001 and [r.seq for r in records] == list(range(1, 12_002))
    assert verify_home(home).intact


def test_one_kind_across_segments_then_another(keyring: LocalKeyring, home: Path) -> None:
    """Each kind in turn over segment boundaries (the hit path remembers the last kind): every record arrives."""
    # 256 KiB segments; close waits for every record (the default 2 s is not enough under make test's load)
    write_config(home, {"delivery": "thread", "flush_interval": 60, "max_spool_mb": 1, "close_timeout": 300})
    with Guard.from_env({"KMSGUARD_HOME": str(home)}) as guard:
        for context in ({"n": "a"}, {"n": "b"}, {"n": "a"}):
            start = observer_of(guard)._spool.segment
            while observer_of(guard)._spool.segment < start + 2:
                guard.encrypt(b"x", "general", context)
        seq = observer_of(guard)._spool.seq
    records = records_of(home)
    assert [r.seq for r in records] == list(range(1, seq + 2))  # and the writer-closed record
    assert verify_home(home).intact


NO_REUSE = "[classifications.general.cache]\nreuse = false\n"


def test_full_path_operations_of_one_kind_are_spooled_compactly(keyring: LocalKeyring, home: Path) -> None:
    """Cache off: every encrypt calls the key service, yet all but the first of a kind is a hit frame."""
    write_config(home, {"delivery": "thread"}, extra=NO_REUSE)
    with Guard.from_env({"KMSGUARD_HOME": str(home)}) as guard:
        sealed = [guard.encrypt(b"x" * (i + 1), "general", {"tenant": "t-1"}) for i in range(6)]
        with pytest.raises(InvalidCiphertext):
            guard.decrypt(sealed[0][:-1] + bytes([sealed[0][-1] ^ 1]), {"tenant": "t-1"})
        with pytest.raises(InvalidCiphertext):
            guard.decrypt(sealed[1][:-1] + bytes([sealed[1][-1] ^ 1]), {"tenant": "t-1"})
        shapes = [k for k in observer_of(guard)._templates if isinstance(k, tuple)]
    assert sorted(s[0] for s in shapes) == ["decrypt", "encrypt"]  # each kind's second operation on
    records = records_of(home)[:-1]
    assert [(r.operation, r.outcome, r.error_code) for r in records] == [("encrypt", "ok", None)] * 6 + [
        ("decrypt", "error", "INVALID_CIPHERTEXT")
    ] * 2
    first, rest = records[0], records[1:6]
    for r in rest:
        assert (r.key_refs, r.regions, r.principal, r.kms_calls, r.cache_hit, r.context) == (
            first.key_refs, first.regions, first.principal, first.kms_calls, first.cache_hit, first.context
        )
    assert first.key_refs == ("local:general:v1",)
    assert [r.size for r in records[:6]] == [1, 2, 3, 4, 5, 6]
    assert len({r.request_id for r in records}) == len(records)
    assert verify_home(home).intact


def test_a_kind_seen_once_costs_no_template(keyring: LocalKeyring, home: Path) -> None:
    """A context value unique to each call: every record in full, no template spooled for any."""
    write_config(home, {"delivery": "thread"}, extra=NO_REUSE)
    with Guard.from_env({"KMSGUARD_HOME": str(home)}) as guard:
        for i in range(5):
            guard.encrypt(b"x", "general", {"booking": f"b-{i}"})
        assert not observer_of(guard)._templates
    records = records_of(home)[:-1]
    assert len(records) == 5 and len({tuple(r.context.values()) for r in records}) == 5
    assert verify_home(home).intact


def test_metrics_count_hits_as_operations(keyring: LocalKeyring, home: Path) -> None:
    write_config(home, {"sink": "none"})
    with Guard.from_env({"KMSGUARD_HOME": str(home)}) as guard:
        for _ in range(10):
            guard.encrypt(b"x", "general")
        metrics = next(o for o in guard.observers if isinstance(o, Metrics))
        text = metrics.exposition().decode()
    labels = '{classification="general",operation="encrypt",outcome="ok"}'
    assert f"kmsguard_operations_total{labels} 10.0" in text
    assert f"kmsguard_operation_duration_seconds_count{labels} 10.0" in text
    assert 'kmsguard_cache_events_total{classification="general",event="hit"} 9.0' in text


# ---------------------------------------------------------------------- the frames themselves

SHAPE = ("encrypt", "general", ("local:general:v1",), (), "svc", "ok", None, 0, True, (("tenant", "t"),))


def _template(tid: int, shape: tuple[object, ...] = SHAPE) -> bytes:
    payload = marshal.dumps((TEMPLATE, tid, shape, "abc"))
    return struct.pack(">II", len(payload), zlib.crc32(payload)) + payload


def _hit(seq: int, tid: int, check: int | None = None) -> bytes:
    values = (seq, tid, 1_700_000_000_000_000, 2_500, 1024, 7)
    header = struct.pack(">II", HIT_FLAG | HIT_PAYLOAD, hit_check(*values) if check is None else check)
    return header + struct.pack(">6Q", *values)


def test_a_hit_frame_expands_to_its_record() -> None:
    entries, used = decode(_template(3) + _hit(1, 3), {})
    assert used == len(_template(3)) + 56
    [(seq, hits)] = entries
    assert seq == 1 and isinstance(hits, Hits) and len(hits) == 1
    assert hits.template.shape == SHAPE and hits.template.prefix == "abc"
    assert hits.first() == (1_700_000_000_000_000, 2_500, 1024, 7)


@pytest.mark.parametrize(
    "data",
    [
        _template(3) + _hit(1, 3, check=0),  # torn or stale: the check fails
        _template(3) + _hit(1, 4),  # names a template this segment has not got
        _template(3) + _hit(1, 3)[:40],  # cut short
    ],
    ids=["bad-check", "unknown-template", "short"],
)
def test_a_bad_hit_frame_ends_what_is_readable(data: bytes) -> None:
    entries, used = decode(data, {})
    assert entries == [] and used == len(_template(3))


def _frames_modules() -> list[ModuleType]:
    """The installed (compiled) frames module and its source run as plain Python."""
    source = Path(frames.__file__).with_name("frames.py")
    spec = importlib.util.spec_from_file_location("kmsguard_frames_source", source)
    assert spec is not None and spec.loader is not None
    plain = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plain)
    return [frames, plain]


@pytest.mark.parametrize("module", _frames_modules(), ids=["compiled", "source"])
def test_frames_write_what_decode_reads(module: ModuleType) -> None:
    mapped = mmap.mmap(-1, 4096)
    f = module.Frames(threading.Lock(), 4096, 1 << 20)
    f.attach(mapped)
    assert f.hit(3, 1, 2, 3, 4) == module.NOT_WRITTEN  # the template is not in this segment yet
    f.emitted.add(3)
    assert [f.hit(3, 1_700_000_000_000_000, 2_500, 1024, n) for n in (7, 8)] == [1, 2]
    with f.exclusive():
        assert f.hit(3, 1, 2, 3, 4) == module.NOT_WRITTEN  # spool.py is busy: step aside
    f.limit = f.written
    assert f.hit(3, 1, 2, 3, 4) == module.NOT_WRITTEN  # full
    entries, _used = decode(_template(3) + bytes(mapped[: f.pos]), {})
    [(seq, hits)] = entries  # consecutive hits of one template: read as one run
    assert seq == 1 and isinstance(hits, Hits) and hits.template.prefix == "abc"
    assert list(RUN_ITEM.iter_unpack(hits.items)) == [(1_700_000_000_000_000, 2_500, 1024, n) for n in (7, 8)]
    f.limit = 1 << 20
    f.pos = 4096 - 55
    assert f.hit(3, 1, 2, 3, 4) == module.NOT_WRITTEN  # no room left in the segment
    following = mmap.mmap(-1, 4096)
    f.attach(following)
    assert f.hit(3, 1, 2, 3, 4) == module.NOT_WRITTEN  # a new segment: the template first, however recent its last hit
    f.close()
    following.close()
    assert f.hit(3, 1, 2, 3, 4) == module.NOT_WRITTEN  # closed for good: the slow path refuses
    assert f.write_hit(3, 1, 2, 3, 4) == module.NOT_WRITTEN  # even for spool.py: there is no map any more
    mapped.close()


@pytest.mark.parametrize("delivery", ["process", "thread"])
def test_flush_sees_a_run_of_hits_delivered(keyring: LocalKeyring, home: Path, delivery: str) -> None:
    """Progress is the last record a run holds, not its first: else flush waits for ever on a delivered run."""
    write_config(home, {"delivery": delivery, "flush_interval": 60})
    with Guard.from_env({"KMSGUARD_HOME": str(home)}) as guard:
        for _ in range(1_000):
            guard.encrypt(b"x", "general", {"tenant": "t"})
        observer = observer_of(guard)
        assert observer.flush(timeout=10)
        assert observer.delivered_seq == 1_000
