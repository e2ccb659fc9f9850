"""Where stored ciphertexts live, named by one URL-like argument.

- ``postgresql://user@host:port/db?table=bookings&column=passport&key=id[&where=SQL]``
  (``table`` may be ``schema.table``; ``where`` is trusted SQL from the operator, as in psql)
- ``sqlite:///path/app.db?table=bookings&column=passport&key=id[&where=SQL]``
- ``dir:/path/to/envelopes`` (or the path of an existing directory): one envelope per file;
  dot files are not data (the journal and temporary files are dot files)
- ``jsonl:/path/data.jsonl?field=$.passport`` (a JSONPath, jsonpath-ng) and
  ``csv:/path/data.csv?column=passport``: a token field per record

A table column may be binary (``bytea``/BLOB: binary envelopes) or text (``kg1:`` tokens);
NULLs are not values. The ``key`` column orders the table and must be unique (the primary
key): batches are key ranges, and the compare-and-set update finds a row by it.
"""

from __future__ import annotations

import abc
import contextlib
import csv
import hashlib
import io
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from kmsguard.errors import InvalidInput

#: A stored value as read: binary envelope / plaintext bytes, or text.
Value = bytes | str

_TABLE_PARAMS = ("table", "column", "key", "where")


@dataclass(frozen=True)
class TableSpec:
    """A table column: where the values are, how rows are found, which rows count."""

    table: str
    column: str
    key: str
    where: str | None

    @classmethod
    def of(cls, params: dict[str, str], url: str) -> TableSpec:
        missing = [p for p in ("table", "column", "key") if not params.get(p)]
        if missing:
            raise InvalidInput(
                f"{_safe(url)}: a table source needs {', '.join(missing)} (e.g. ?table=t&column=c&key=id)"
            )
        return cls(params["table"], params["column"], params["key"], params.get("where") or None)


class Source(abc.ABC):
    """A set of stored values. ``label`` names it without any password (logs, census records)."""

    label: str

    @abc.abstractmethod
    def values(self, batch: int) -> Iterator[list[Value]]:
        """Every value (no NULLs), in lists of at most ``batch``; for the census."""

    def job_name(self, kind: str, extra: str) -> str:
        """The identity of a rewrap/migrate job over this source (same source and options: same job)."""
        digest = hashlib.sha256(f"{kind}\0{self.label}\0{extra}".encode()).hexdigest()[:16]
        return f"{kind}:{digest}"


class TableSource(Source):
    """A column of a PostgreSQL or SQLite table (see :mod:`kmsguard.rotation.tables`)."""

    def __init__(self, url: str, spec: TableSpec) -> None:
        self.url = url
        self.spec = spec
        self.label = f"{_safe(url)}#{spec.table}.{spec.column}" + (f" where {spec.where}" if spec.where else "")

    def job_name(self, kind: str, extra: str) -> str:
        """Without the connection part: the job table is in the same database, and hosts may
        name that database differently (another host name, a replica's address, a password)."""
        spec = self.spec
        digest = hashlib.sha256(f"{kind}\0{spec.table}\0{spec.column}\0{spec.key}\0{spec.where}\0{extra}".encode())
        return f"{kind}:{digest.hexdigest()[:16]}"

    def values(self, batch: int) -> Iterator[list[Value]]:
        from kmsguard.rotation.tables import open_table

        with open_table(self) as table:
            yield from table.scan(batch)


class DirSource(Source):
    """A directory of envelope files (binary or ``kg1:`` text), one envelope per file."""

    def __init__(self, path: Path) -> None:
        if not path.is_dir():
            raise InvalidInput(f"{path} is not a directory")
        self.path = path
        self.label = f"dir:{path.resolve()}"

    def files(self) -> list[Path]:
        return sorted(p for p in self.path.iterdir() if not p.name.startswith(".") and p.is_file())

    def values(self, batch: int) -> Iterator[list[Value]]:
        chunk: list[Value] = []
        for path in self.files():
            chunk.append(path.read_bytes())
            if len(chunk) >= batch:
                yield chunk
                chunk = []
        if chunk:
            yield chunk


class RecordsSource(Source):
    """A JSON-lines or CSV file whose records hold a token (or plaintext) in one field."""

    def __init__(self, path: Path, fmt: str, field: str) -> None:
        if not path.is_file():
            raise InvalidInput(f"{path} is not a file")
        self.path = path
        self.format = fmt
        self.field = field
        self.label = f"{fmt}:{path.resolve()}?{'field' if fmt == 'jsonl' else 'column'}={field}"
        if fmt == "jsonl":
            from jsonpath_ng import parser

            try:
                self._path = parser.parse(field)
            except Exception as exc:  # the parser raises several kinds (its own, lexer errors)
                raise InvalidInput(f"field: {field!r} is not a JSONPath ({type(exc).__name__})") from None

    def read(self) -> tuple[list[Any], list[str] | None]:
        """The records (dicts) and, for CSV, the header row."""
        text = self.path.read_text(encoding="utf-8")
        if self.format == "jsonl":
            records = []
            for n, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except ValueError:
                    raise InvalidInput(f"{self.path}: line {n} is not JSON") from None
            return records, None
        reader = csv.DictReader(io.StringIO(text, newline=""))
        if reader.fieldnames is None or self.field not in reader.fieldnames:
            raise InvalidInput(f"{self.path}: no column {self.field!r}")
        return list(reader), list(reader.fieldnames)

    def render(self, records: Sequence[Any], header: list[str] | None) -> bytes:
        if self.format == "jsonl":
            return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
        out = io.StringIO(newline="")
        writer = csv.DictWriter(out, fieldnames=header or [])
        writer.writeheader()
        writer.writerows(records)
        return out.getvalue().encode("utf-8")

    def slots(self, record: Any) -> list[tuple[str, Callable[[str], Any]]]:
        """Each string value of the field in ``record`` with a setter that replaces it."""
        if self.format == "csv":
            value = record.get(self.field)

            def put(new: str) -> None:
                record[self.field] = new

            return [(value, put)] if value else []
        out: list[tuple[str, Callable[[str], Any]]] = []
        for match in self._path.find(record):
            if isinstance(match.value, str):
                out.append((match.value, _setter(match.full_path, record)))
        return out

    def values(self, batch: int) -> Iterator[list[Value]]:
        records, _ = self.read()
        chunk: list[Value] = []
        for record in records:
            chunk.extend(value for value, _ in self.slots(record))
            if len(chunk) >= batch:
                yield chunk
                chunk = []
        if chunk:
            yield chunk


def _setter(path: Any, record: Any) -> Callable[[str], Any]:
    def put(new: str) -> Any:
        return path.update(record, new)

    return put


def open_source(url: str) -> Source:
    """The source named by ``url``; InvalidInput saying what is wrong (never echoing a password)."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    params = dict(parse_qsl(parts.query, keep_blank_values=True))
    if scheme in ("postgresql", "postgres"):
        return TableSource(url, TableSpec.of(params, url))
    if scheme == "sqlite":
        return TableSource(url, TableSpec.of(params, url))
    if scheme == "dir":
        return DirSource(Path(parts.netloc + parts.path))
    if scheme in ("jsonl", "csv"):
        name = "field" if scheme == "jsonl" else "column"
        if not params.get(name):
            raise InvalidInput(f"{_safe(url)}: a {scheme} source needs ?{name}=...")
        return RecordsSource(Path(parts.netloc + parts.path), scheme, params[name])
    if not scheme and Path(url).is_dir():
        return DirSource(Path(url))
    raise InvalidInput(
        f"{_safe(url)}: not a source (postgresql://...?table=&column=&key=, sqlite:///file?..., dir:PATH, "
        "jsonl:FILE?field=$.path, csv:FILE?column=NAME)"
    )


def connection_url(url: str) -> str:
    """``url`` without kmsguard's own parameters: what the database driver gets."""
    parts = urlsplit(url)
    rest = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in _TABLE_PARAMS]
    return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(rest), ""))


def sqlite_path(url: str) -> str:
    """``sqlite:///abs/app.db`` (or ``sqlite:////abs/app.db``) -> ``/abs/app.db``; ``sqlite:app.db`` -> ``app.db``."""
    parts = urlsplit(url)
    path = parts.netloc + parts.path
    return "/" + path.lstrip("/") if path.startswith("/") else path


def _safe(url: str) -> str:
    """``url`` with any password replaced, and its query dropped (a where= clause is the operator's)."""
    parts = urlsplit(url)
    if parts.scheme.lower() == "sqlite":
        return f"sqlite:{sqlite_path(url)}"
    netloc = parts.netloc
    if parts.password is not None:
        netloc = netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def replace_file(path: Path, data: bytes) -> None:
    """Replace ``path`` atomically (temp file, fsync, rename, fsync the directory), keeping its mode.

    A reader, or a run killed at any point, sees the old file or the new one, never a mix.
    """
    mode = path.stat().st_mode & 0o777
    tmp = path.with_name(f".{path.name}.kmsguard-tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
