"""``kmsguard encrypt --jsonl`` and ``decrypt --jsonl``: one JSON record per line, in and out, in order.

Encrypt reads ``{"id": ..., "data": "text"}`` (UTF-8 text) or ``{"id": ..., "data_b64": "..."}``
(standard base64, for binary), with an optional ``"context": {"k": "v"}`` added to the
``--context`` pairs, and writes ``{"id": ..., "token": "kg1:..."}``. Decrypt reads
``{"id": ..., "token": "kg1:..."}`` and writes ``{"id": ..., "data": "text"}``, or
``{"id": ..., "data_b64": "..."}`` when the plaintext is not UTF-8. ``id`` is any JSON value
and is echoed back untouched.

A record that fails (bad JSON, a missing field, a kmsguard error) becomes
``{"id": ..., "line": N, "error": {"code": ..., "message": ..., "retryable": ...}}`` and the
stream goes on; error messages never quote the input. Records are processed in chunks
through ``Guard.encrypt_many`` / ``decrypt_many``, so memory stays flat on any input size.
"""

from __future__ import annotations

import base64
import binascii
import json
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext
from typing import IO, Any

from kmsguard import envelope
from kmsguard.errors import InvalidInput, KmsGuardError
from kmsguard.guard import Guard

#: Records handed to one encrypt_many / decrypt_many call.
CHUNK = 512

_Outcome = dict[str, Any]


def encrypt_stream(guard: Guard, classification: str, context: dict[str, str], lines: IO[bytes], out: IO[str]) -> int:
    """Encrypt every record of ``lines`` into ``out``; returns how many records failed."""

    def parse(record: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
        extra = record.get("context", {})
        if not isinstance(extra, dict):
            raise InvalidInput('"context" must be an object of strings')
        return _plaintext(record), {**context, **extra}

    def run(payloads: list[tuple[bytes, dict[str, str]]]) -> list[_Outcome]:
        results = guard.encrypt_many([p for p, _ in payloads], classification, contexts=[c for _, c in payloads])
        return [{"token": envelope.to_text(r.value)} if r.value is not None else _error(r.error) for r in results]

    return _stream(lines, out, parse, run)


def decrypt_stream(guard: Guard, context: dict[str, str], lines: IO[bytes], out: IO[str]) -> int:
    """Decrypt every record of ``lines`` into ``out``; returns how many records failed."""

    def parse(record: dict[str, Any]) -> str:
        token = record.get("token")
        if not isinstance(token, str):
            raise InvalidInput('a record needs "token" (a kg1: string)')
        return token

    def run(tokens: list[str]) -> list[_Outcome]:
        return [_data(r.value) if r.value is not None else _error(r.error) for r in guard.decrypt_many(tokens, context)]

    return _stream(lines, out, parse, run)


# ---------------------------------------------------------------------- the stream


def _stream(
    lines: IO[bytes],
    out: IO[str],
    parse: Callable[[dict[str, Any]], Any],
    run: Callable[[list[Any]], list[_Outcome]],
) -> int:
    failures = 0
    with _progress() as advance:
        for chunk in _chunks(_records(lines, parse), CHUNK):
            good = [(n, rid, payload) for n, rid, payload, err in chunk if err is None]
            outcomes = iter(run([payload for _, _, payload in good]))
            for n, rid, _payload, err in chunk:
                outcome = _error(err) if err is not None else next(outcomes)
                record = {"id": rid, **outcome}
                if "error" in outcome:
                    failures += 1
                    record["line"] = n
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
            out.flush()
            advance(len(chunk))
    return failures


def _records(
    lines: IO[bytes], parse: Callable[[dict[str, Any]], Any]
) -> Iterator[tuple[int, Any, Any, KmsGuardError | None]]:
    """(line number, id, payload, error) per non-blank line; a bad line carries its error."""
    for n, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        rid = None
        try:
            try:
                record = json.loads(raw)
            except (UnicodeDecodeError, ValueError):
                raise InvalidInput("not a JSON object") from None
            if not isinstance(record, dict):
                raise InvalidInput("not a JSON object")
            rid = record.get("id")
            yield n, rid, parse(record), None
        except KmsGuardError as exc:
            yield n, rid, None, exc


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _plaintext(record: dict[str, Any]) -> bytes:
    if "data" in record:
        if not isinstance(record["data"], str):
            raise InvalidInput('"data" must be a string (use "data_b64" for binary)')
        try:
            return record["data"].encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate such as "\ud800"
            raise InvalidInput('"data" is not valid Unicode text (use "data_b64")') from None
    if "data_b64" in record:
        try:
            return base64.b64decode(record["data_b64"], validate=True)
        except (binascii.Error, TypeError, ValueError):
            raise InvalidInput('"data_b64" is not valid base64') from None
    raise InvalidInput('a record needs "data" (text) or "data_b64" (base64)')


def _data(plaintext: bytes) -> _Outcome:
    try:
        return {"data": plaintext.decode("utf-8")}
    except UnicodeDecodeError:
        return {"data_b64": base64.b64encode(plaintext).decode("ascii")}


def _error(error: KmsGuardError | None) -> _Outcome:
    assert error is not None
    return {"error": error.to_dict()}


def _progress() -> AbstractContextManager[Callable[[int], None]]:
    """A live record counter on stderr when it is a terminal; otherwise nothing at all."""
    if not sys.stderr.isatty():
        return nullcontext(lambda _n: None)
    return _RichCounter()


class _RichCounter:
    def __enter__(self) -> Callable[[int], None]:
        from rich.console import Console
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self._progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.completed:,} records"),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        self._progress.__enter__()
        task = self._progress.add_task("records", total=None)
        return lambda n: self._progress.advance(task, n)

    def __exit__(self, *exc: object) -> None:
        self._progress.__exit__(None, None, None)
