"""Shared CLI plumbing: binary-safe input and output, ``k=v`` context options, the Guard."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import click

from kmsguard.config import Settings, load_settings
from kmsguard.errors import InvalidInput
from kmsguard.guard import Guard

context_option = click.option(
    "--context",
    "-c",
    "context",
    multiple=True,
    metavar="KEY=VALUE",
    help="Encryption context pair; repeat for more.",
)
in_option = click.option("--in", "in_path", default="-", show_default=True, help="Input file, or - for stdin.")
out_option = click.option("--out", "out_path", default="-", show_default=True, help="Output file, or - for stdout.")


def parse_context(pairs: tuple[str, ...]) -> dict[str, str]:
    context: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint="--context")
        if key in context:
            raise click.BadParameter(f"context key {key!r} given twice", param_hint="--context")
        context[key] = value
    return context


def read_input(path: str) -> bytes:
    if path == "-":
        return sys.stdin.buffer.read()
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise InvalidInput(f"cannot read {path}: {exc.strerror}") from None


def write_output(path: str, data: bytes) -> None:
    """Write to stdout or a file; a new file gets mode 0600, since it may hold plaintext."""
    if path == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
    except OSError as exc:
        raise InvalidInput(f"cannot write {path}: {exc.strerror}") from None


def open_input(path: str) -> IO[bytes]:
    """stdin, or the file at ``path`` opened for reading (InvalidInput if it cannot be)."""
    if path == "-":
        return sys.stdin.buffer
    try:
        return open(path, "rb")
    except OSError as exc:
        raise InvalidInput(f"cannot read {path}: {exc.strerror}") from None


@contextmanager
def output(path: str) -> Iterator[IO[bytes]]:
    """stdout, or a new file at ``path`` (mode 0600) that appears only if the block succeeds.

    The data goes to a temporary file in the same directory, renamed into place when the
    block returns; on any error the temporary file is removed and no output file remains
    (an existing file at ``path`` is left as it was). stdout gets the data as it comes.
    """
    if path == "-":
        yield sys.stdout.buffer
        sys.stdout.buffer.flush()
        return
    target = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent or ".")
    except OSError as exc:
        raise InvalidInput(f"cannot write {path}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def settings() -> Settings:
    # A one-shot command delivers its audit records from a thread: a deliverer process
    # would take longer to start than the command takes to run.
    return load_settings({"KMSGUARD_AUDIT_DELIVERY": "thread", **os.environ})


def guard() -> Guard:
    return Guard.from_settings(settings())
