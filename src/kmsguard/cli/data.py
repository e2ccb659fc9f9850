"""``kmsguard encrypt``, ``decrypt``, ``inspect`` and ``cat``: data in, data out, nothing else printed.

``encrypt`` writes envelope suite 2 (segments, bounded memory) when the input is larger
than ``[stream] threshold`` or ``--stream`` is given, else suite 1; ``decrypt`` reads
either. Output to a file appears only once everything is verified (see io.output).
"""

from __future__ import annotations

import io
import json
import os
import stat
import sys
from collections.abc import Callable, Iterator
from typing import IO

import click

from kmsguard import envelope, segments
from kmsguard.cli import jsonl as stream
from kmsguard.cli.io import (
    context_option,
    guard,
    in_option,
    open_input,
    out_option,
    output,
    parse_context,
    read_input,
    settings,
)
from kmsguard.config_table import ConfigTable
from kmsguard.errors import InvalidInput
from kmsguard.guard import EnvelopeInfo, Guard

#: ``[stream] threshold``: inputs larger than this are encrypted as streams (suite 2).
DEFAULT_THRESHOLD = 8 * 1024 * 1024
_STREAM_FIELDS = ("threshold", "segment_size")
#: Bytes ``cat`` and a streamed ``encrypt`` read at a time.
_CHUNK = 1 << 20

jsonl_option = click.option(
    "--jsonl",
    is_flag=True,
    help="Stream JSON lines: one record per line in, one result per line out (see docs/caching.md, Batches).",
)


def _run_jsonl(in_path: str, out_path: str, run: Callable[[Guard, IO[bytes], IO[str]], int]) -> None:
    """Open the streams, run, and exit 1 (after writing every record) if any record failed."""
    try:
        source = sys.stdin.buffer if in_path == "-" else open(in_path, "rb")  # noqa: SIM115
        sink = sys.stdout if out_path == "-" else open(out_path, "w", encoding="utf-8")  # noqa: SIM115
    except OSError as exc:
        raise click.FileError(exc.filename or in_path, exc.strerror) from None
    try:
        with guard() as g:
            failures = run(g, source, sink)
    finally:
        for stream_ in (source, sink):
            if stream_ not in (sys.stdin.buffer, sys.stdout):
                stream_.close()
    if failures:
        click.echo(f"{failures} record(s) failed; see their error records", err=True)
        sys.exit(1)


def _stream_settings() -> tuple[int, int]:
    """(threshold, segment size) from ``[stream]`` in the configuration."""
    table = ConfigTable(settings().section("stream"), "stream", _STREAM_FIELDS)
    threshold = table.integer("threshold", DEFAULT_THRESHOLD, minimum=0, maximum=envelope.MAX_PLAINTEXT)
    size = table.integer(
        "segment_size",
        segments.DEFAULT_SEGMENT_SIZE,
        minimum=segments.MIN_SEGMENT_SIZE,
        maximum=segments.MAX_SEGMENT_SIZE,
    )
    return threshold, size


@click.command()
@click.option("--class", "classification", required=True, help="Classification: general, pii, payment, ...")
@context_option
@in_option
@out_option
@click.option("--text", is_flag=True, help="Write the kg1: text form (one line) instead of binary.")
@click.option("--stream", "force_stream", is_flag=True, help="Encrypt as a stream (suite 2) whatever the size.")
@click.option(
    "--segment-size",
    type=click.IntRange(segments.MIN_SEGMENT_SIZE, segments.MAX_SEGMENT_SIZE),
    help="Plaintext bytes per segment of a stream (default: [stream] segment_size, 65536).",
)
@jsonl_option
def encrypt(
    classification: str,
    context: tuple[str, ...],
    in_path: str,
    out_path: str,
    text: bool,
    force_stream: bool,
    segment_size: int | None,
    jsonl: bool,
) -> None:
    """Encrypt a file or stdin; a large input (over [stream] threshold, default 8 MiB) as a stream."""
    ctx = parse_context(context)
    if jsonl:
        _run_jsonl(in_path, out_path, lambda g, i, o: stream.encrypt_stream(g, classification, ctx, i, o))
        return
    if text and force_stream:
        raise click.BadParameter("the kg1: text form holds suite 1 only", param_hint="--text")
    threshold, default_size = _stream_settings()
    source = open_input(in_path)
    try:
        known = _regular_file_size(source)
        streamed = force_stream or (not text and known is not None and known > threshold)
        # Else one byte past the threshold is read: more means a stream (of what was read, then the rest).
        head = b"" if streamed else _read_up_to(source, threshold + 1)
        streamed = streamed or (not text and len(head) > threshold)
        with guard() as g, output(out_path) as sink:
            if streamed:
                size = segment_size or default_size
                g.encrypt_stream(_chain(head, source), sink, classification, ctx, segment_size=size)
            else:
                sealed = g.encrypt(head + source.read(), classification, ctx)
                sink.write((envelope.to_text(sealed) + "\n").encode("ascii") if text else sealed)
    finally:
        if source is not sys.stdin.buffer:
            source.close()


def _regular_file_size(source: IO[bytes]) -> int | None:
    """The size of ``source`` if it is a regular file (not a pipe or terminal), else None."""
    try:
        info = os.fstat(source.fileno())
    except (OSError, ValueError, io.UnsupportedOperation):
        return None
    return info.st_size if stat.S_ISREG(info.st_mode) else None


def _read_up_to(source: IO[bytes], n: int) -> bytes:
    """``n`` bytes, or fewer at the end (a pipe's read may return less)."""
    parts = []
    while n > 0 and (chunk := source.read(min(n, _CHUNK))):
        parts.append(chunk)
        n -= len(chunk)
    return b"".join(parts)


def _chain(head: bytes, source: IO[bytes]) -> Iterator[bytes]:
    """``head``, then the rest of ``source``."""
    if head:
        yield head
    while chunk := source.read(_CHUNK):
        yield chunk


@click.command()
@context_option
@in_option
@out_option
@jsonl_option
def decrypt(context: tuple[str, ...], in_path: str, out_path: str, jsonl: bool) -> None:
    """Decrypt a binary envelope or a kg1: token from a file or stdin."""
    ctx = parse_context(context)
    if jsonl:
        _run_jsonl(in_path, out_path, lambda g, i, o: stream.decrypt_stream(g, ctx, i, o))
        return
    source = open_input(in_path)
    try:
        with guard() as g, output(out_path) as sink:
            g.decrypt_stream(source, sink, ctx)
    finally:
        if source is not sys.stdin.buffer:
            source.close()


@click.command()
@in_option
def inspect(in_path: str) -> None:
    """Show an envelope's header as JSON (decrypts nothing, needs no key)."""
    if in_path == "-":
        info = EnvelopeInfo.of(read_input(in_path))
    else:
        with open_input(in_path) as fh:
            first = fh.read(segments.MAX_HEADER_SIZE)
            if first[:2] == envelope.MAGIC and first[3:4] == bytes((segments.SUITE,)):
                info = EnvelopeInfo.of_stream(first, fh.seek(0, os.SEEK_END))  # the segments stay on disk
            else:
                info = EnvelopeInfo.of(first + fh.read())
    click.echo(json.dumps(info.to_dict(), indent=2, ensure_ascii=False))


@click.command()
@context_option
@click.option("--in", "in_path", required=True, help="An encrypted stream (suite 2) file.")
@click.option("--offset", type=click.IntRange(min=0), default=0, show_default=True, help="First plaintext byte.")
@click.option("--length", type=click.IntRange(min=0), default=None, help="Bytes to print (default: to the end).")
def cat(context: tuple[str, ...], in_path: str, offset: int, length: int | None) -> None:
    """Print a byte range of an encrypted stream, decrypting only the segments it touches."""
    ctx = parse_context(context)
    out = sys.stdout.buffer
    with guard() as g:
        try:
            reader = g.open_encrypted(in_path, ctx)
        except OSError as exc:
            raise InvalidInput(f"cannot read {in_path}: {exc.strerror}") from None
        with reader:
            reader.seek(offset)
            left = reader.size if length is None else length
            buf = memoryview(bytearray(max(1, min(_CHUNK, left))))
            while left > 0 and (n := reader.readinto(buf[: min(left, len(buf))])):
                out.write(buf[:n])
                left -= n
    out.flush()
