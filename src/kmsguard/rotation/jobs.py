"""Running a rewrap or migrate job over a source: resumable, shared by workers, guarded.

Tables (PostgreSQL, SQLite): the job is planned once in the ``kmsguard_rewrap`` table as
key ranges of ``--batch`` rows; every worker process, on any host, claims one pending
batch at a time and does all of it in one transaction (see :mod:`.tables`). Run the same
command again after a crash and it continues the open run; run it after a finished run
and a new run checks everything again (and, values being current, changes nothing).

Files (a directory, a JSON-lines or CSV file): one worker at a time (a lock file says so),
progress in a journal next to the data (``.kmsguard-journal.json``). Every file is
replaced atomically, so a killed run leaves each file old or new, never half-written: a
directory's files one by one (the journal lists those done), a records file once at the
end of the run (a killed run wrote nothing and starts over).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

from kmsguard.errors import InvalidInput
from kmsguard.rotation.progress import Progress, RateLimit
from kmsguard.rotation.sources import DirSource, RecordsSource, Source, TableSource, Value, replace_file
from kmsguard.rotation.tables import BatchResult, open_table

JOURNAL = ".kmsguard-journal.json"


class Transform(Protocol):
    """What a job does to one batch of rows (:class:`.rewrap.Rewrap`, :class:`.migrate.Migrate`)."""

    kind: str

    def options(self) -> str: ...

    def columns(self) -> list[str]: ...

    def wants(self, value: Value) -> bool | None: ...

    def apply(self, rows: Sequence[tuple[Any, Value, dict[str, Any]]]) -> tuple[list[Any], BatchResult]: ...


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def job_of(source: Source, transform: Transform) -> str:
    return source.job_name(transform.kind, transform.options())


def run(source: Source, transform: Transform, batch: int, max_rate: float | None, progress: Progress) -> dict[str, Any]:
    """Do (or continue) the job; the summary of its run, failures included."""
    if batch < 1:
        raise InvalidInput("--batch must be at least 1")
    if isinstance(source, TableSource):
        return run_table(source, transform, batch, max_rate, progress)
    if transform.columns() and not isinstance(source, RecordsSource):
        raise InvalidInput("--context-from needs a table or a records file (a directory's files have no columns)")
    with _exclusive(_journal_dir(source)):
        for stale in _journal_dir(source).glob(".*.kmsguard-tmp"):  # a killed run's, never renamed into place
            stale.unlink()
        if isinstance(source, DirSource):
            return _run_dir(source, transform, batch, max_rate, progress)
        assert isinstance(source, RecordsSource)
        return _run_records(source, transform, batch, max_rate, progress)


def plan(source: TableSource, transform: Transform, batch: int) -> tuple[str, int]:
    """Plan (or find the open run of) the job; (job, run)."""
    with open_table(source) as table:
        job = job_of(source, transform)
        return job, table.plan(job, batch)


def table_summary(source: TableSource, job: str, run_no: int) -> dict[str, Any]:
    with open_table(source) as table:
        return {"job": job, "run": run_no, **table.summary(job, run_no), "failures": table.failures(job, run_no)}


def run_table(
    source: TableSource, transform: Transform, batch: int, max_rate: float | None, progress: Progress
) -> dict[str, Any]:
    worker = worker_id()
    limit = RateLimit(max_rate)
    with open_table(source) as table:
        job = job_of(source, transform)
        run_no = table.plan(job, batch)
        before = table.summary(job, run_no)
        progress.start(before["planned"], before["rows"])
        while True:
            with table.transaction():
                claimed = table.claim(job, run_no)
                if claimed is None:
                    break
                started = time.time()
                rows = table.read(claimed, transform.columns())
                changes, result = transform.apply(rows)
                written = table.compare_and_set(changes)
                result.changed, result.skipped = len(written), len(changes) - len(written)
                table.finish(job, claimed, worker, started, result)
            progress.advance(result.rows)
            limit.wait(result.rows)
        progress.close()
        return {"job": job, "run": run_no, **table.summary(job, run_no), "failures": table.failures(job, run_no)}


def dry_run(source: Source, transform: Transform) -> dict[str, int]:
    """What a run would do, from headers alone: nothing is written, no job is planned."""
    counts = {"rows": 0, "would_change": 0, "current": 0, "not_envelopes": 0}
    for chunk in source.values(10_000):
        for value in chunk:
            wanted = transform.wants(value)
            counts["rows"] += 1
            counts["would_change" if wanted else "current" if wanted is False else "not_envelopes"] += 1
    return counts


# ---------------------------------------------------------------------- files


class Journal:
    """A file job's progress: which files are done, the counts, the failures."""

    def __init__(self, path: Path, job: str) -> None:
        self.path = path
        doc: dict[str, Any] = {}
        with contextlib.suppress(FileNotFoundError, ValueError):
            doc = json.loads(path.read_text(encoding="utf-8"))
        if doc.get("job") != job or doc.get("state") != "running":
            doc = {"job": job, "state": "running", "run": int(doc.get("run", 0)) + 1 if doc.get("job") == job else 1}
            doc |= {"done": [], "counts": _zero(), "failures": []}
        self.doc = doc
        self.done = set(doc["done"])

    def add(self, names: Sequence[str], result: BatchResult) -> None:
        self.done.update(names)
        self.doc["done"] = sorted(self.done)
        counts = self.doc["counts"]
        for name in ("rows", "changed", "current", "skipped", "failed", "key_calls"):
            counts[name] += getattr(result, name)
        counts["batches"] += 1
        self.doc["failures"] += [{"key": k, "code": c} for k, c in result.failures]
        self.save()

    def finish(self) -> dict[str, Any]:
        self.doc["state"] = "finished"
        self.doc["done"] = []
        self.save()
        return {"job": self.doc["job"], "run": self.doc["run"], **self.doc["counts"], "failures": self.doc["failures"]}

    def save(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w", encoding="utf-8") as fh:
            json.dump(self.doc, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)


def _zero() -> dict[str, int]:
    return dict.fromkeys(("batches", "rows", "changed", "current", "skipped", "failed", "key_calls"), 0) | {
        "workers": 1
    }


def _journal_dir(source: DirSource | RecordsSource | Source) -> Path:
    return source.path if isinstance(source, DirSource) else source.path.parent  # type: ignore[attr-defined]


def _journal_path(source: DirSource | RecordsSource) -> Path:
    if isinstance(source, DirSource):
        return source.path / JOURNAL
    return source.path.with_name(f".{source.path.name}{JOURNAL.removeprefix('.kmsguard')}")


@contextlib.contextmanager
def _exclusive(directory: Path) -> Iterator[None]:
    """One file job per directory at a time: a second one fails at once rather than interleave."""
    fd = os.open(directory / ".kmsguard-journal.lock", os.O_CREAT | os.O_RDWR, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InvalidInput(f"another kmsguard job is running on files in {directory}") from None
        yield
    finally:
        os.close(fd)


def _file_value(data: bytes) -> Value:
    """A file's envelope: ``kg1:`` text (surrounding whitespace dropped) or binary."""
    if data.startswith(b"kg1:"):
        with contextlib.suppress(UnicodeDecodeError):
            return data.decode("ascii").strip()
    return data


def _file_bytes(value: Value) -> bytes:
    return (value + "\n").encode("ascii") if isinstance(value, str) else value


def _run_dir(
    source: DirSource, transform: Transform, batch: int, max_rate: float | None, progress: Progress
) -> dict[str, Any]:
    journal = Journal(_journal_path(source), job_of(source, transform))
    files = source.files()
    todo = [p for p in files if p.name not in journal.done]
    progress.start(len(files), len(files) - len(todo))
    limit = RateLimit(max_rate)
    for start in range(0, len(todo), batch):
        chunk = todo[start : start + batch]
        rows: list[tuple[Any, Value, dict[str, Any]]] = [(p.name, _file_value(p.read_bytes()), {}) for p in chunk]
        changes, result = transform.apply(rows)
        for name, old, new in changes:
            path = source.path / name
            if _file_value(path.read_bytes()) == old:  # an application that rewrote it meanwhile wins
                replace_file(path, _file_bytes(new))
                result.changed += 1
            else:
                result.skipped += 1
        journal.add([p.name for p in chunk], result)
        progress.advance(len(chunk))
        limit.wait(len(chunk))
    progress.close()
    return journal.finish()


def _run_records(
    source: RecordsSource, transform: Transform, batch: int, max_rate: float | None, progress: Progress
) -> dict[str, Any]:
    journal = Journal(_journal_path(source), job_of(source, transform))
    journal.doc["counts"] = _zero()  # nothing of an interrupted run was written: start over
    journal.doc["failures"] = []
    before = source.path.read_bytes()
    records, header = source.read()
    slots: list[tuple[str, Value, Callable[[str], Any], dict[str, Any]]] = []
    for n, record in enumerate(records, 1):
        columns = {c: record.get(c) for c in transform.columns()} if isinstance(record, dict) else {}
        for j, (value, put) in enumerate(source.slots(record)):
            slots.append((f"record {n}" + (f"#{j + 1}" if j else ""), value, put, columns))
    progress.start(len(slots))
    limit = RateLimit(max_rate)
    changed = 0
    for start in range(0, len(slots), batch):
        chunk = slots[start : start + batch]
        setters = {key: put for key, _, put, _ in chunk}
        changes, result = transform.apply([(key, value, columns) for key, value, _, columns in chunk])
        for key, _, new in changes:
            setters[key](new)
        result.changed = len(changes)
        changed += len(changes)
        journal.add([], result)
        progress.advance(len(chunk))
        limit.wait(len(chunk))
    progress.close()
    if changed:
        if source.path.read_bytes() != before:  # the application wrote the file meanwhile: it wins
            raise InvalidInput(f"{source.path} changed while the job ran; nothing was written, run it again")
        replace_file(source.path, source.render(records, header))
    return journal.finish()
