"""Writes the audit trail fixtures of release 0.1.0 (commit c56b1cf) that tests/audit/test_formats.py reads.

Run once, against that release's source (not this one: its APIs are gone), from the
repository root of a checkout of c56b1cf:

    PYTHONPATH=src python tests/audit/data/generate_0_1_0.py tests/audit/data

It spools records as that release's AuditObserver did (record, template and hit
frames), delivers the spool with its deliverer into a SQLite database and a JSON lines
file, and saves a copy of the spool segment before delivery and every record as read
back, for the tests to compare field by field.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from kmsguard.audit.deliver import link_batch
from kmsguard.audit.record import AuditKeys, Chain
from kmsguard.audit.sink import JsonLinesSink
from kmsguard.audit.spool import SegmentReader, Spool, decode, segment_path
from kmsguard.audit.sqlite import SqliteSink

SECRET = bytes(range(32))
WRITER = "host-1-0a0b0c0d"
START = 1_764_300_000.0
SHAPE = ("encrypt", "pii", ("local:pii:v1",), (), "svc", "ok", None, 0, True, (("tenant", "t-42"),))
OTHER = ("decrypt", "pii", ("local:pii:v1",), (), "svc", "ok", None, 0, True, (("tenant", "t-42"),))


def full(n: int, operation: str, outcome: str = "ok", error: str | None = None) -> tuple:
    return (START + n, operation, "pii", ("local:pii:v1",), ("eu-west-1",), "svc", outcome, error, 0.0125, 1,
            False, 100 + n, f"0123456789ab{n:010x}", (("tenant", "t-42"), ("purpose", "billing")))


def main(out: Path) -> None:
    spool_dir = out / "spool-tmp"
    spool = Spool(spool_dir, WRITER, 1 << 20, segment_bytes=64 << 10)
    spool.append(full(1, "encrypt"), durable=False)  # seq 1: a record frame
    for i in range(2, 7):  # seq 2-6: hit frames of one template (a run)
        spool.hit(1, SHAPE, "0123456789ab", int((START + i) * 1e6), 2_500 + i, 1024 + i, i)
    spool.hit(2, OTHER, "0123456789ab", int((START + 7) * 1e6), 3_000, 1024, 7)  # seq 7: a lone hit
    spool.append(full(8, "decrypt", "error", "CONTEXT_MISMATCH"), durable=False)  # seq 8
    for i in (9, 10):  # seq 9-10: a run of the first template again
        spool.hit(1, SHAPE, "0123456789ab", int((START + i) * 1e6), 2_500 + i, 1024 + i, i)
    closed = (START + 11, "writer-closed", None, (), (), "svc", "ok", None, 0.0, 0, None, 0, None, ())
    spool.append(closed, durable=True)  # seq 11
    spool.close()
    segment = segment_path(spool_dir, WRITER, 1).read_bytes()
    _entries, used = decode(segment, {})
    (out / "spool-0.1.0.bin").write_bytes(segment[:used])  # without the unwritten (zero) rest

    keys = AuditKeys(SECRET)
    sinks = [SqliteSink(out / "trail-0.1.0.db"), JsonLinesSink(out / "trail-0.1.0.jsonl")]
    reader, chain = SegmentReader(spool_dir, WRITER), Chain(keys, WRITER)
    entries, _used = reader.read(1 << 20, writer_alive=False)
    rows = link_batch(chain, entries)
    for sink in sinks:
        sink.write(rows)
    records = [r.to_dict() for r in sinks[0].records()]
    (out / "trail-0.1.0.json").write_text(json.dumps(records, indent=1) + "\n")
    for sink in sinks:
        sink.close()
    shutil.rmtree(spool_dir)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
