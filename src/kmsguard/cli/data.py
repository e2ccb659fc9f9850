"""``kmsguard encrypt``, ``decrypt`` and ``inspect``: data in, data out, nothing else printed."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import IO

import click

from kmsguard import envelope
from kmsguard.cli import jsonl as stream
from kmsguard.cli.io import context_option, guard, in_option, out_option, parse_context, read_input, write_output
from kmsguard.guard import EnvelopeInfo, Guard

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


@click.command()
@click.option("--class", "classification", required=True, help="Classification: general, pii, payment, ...")
@context_option
@in_option
@out_option
@click.option("--text", is_flag=True, help="Write the kg1: text form (one line) instead of binary.")
@jsonl_option
def encrypt(
    classification: str, context: tuple[str, ...], in_path: str, out_path: str, text: bool, jsonl: bool
) -> None:
    """Encrypt a file or stdin."""
    ctx = parse_context(context)
    if jsonl:
        _run_jsonl(in_path, out_path, lambda g, i, o: stream.encrypt_stream(g, classification, ctx, i, o))
        return
    plaintext = read_input(in_path)
    with guard() as g:
        sealed = g.encrypt(plaintext, classification, ctx)
    write_output(out_path, (envelope.to_text(sealed) + "\n").encode("ascii") if text else sealed)


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
    data = read_input(in_path)
    with guard() as g:
        write_output(out_path, g.decrypt(envelope.coerce(data), ctx))


@click.command()
@in_option
def inspect(in_path: str) -> None:
    """Show an envelope's header as JSON (decrypts nothing, needs no key)."""
    info = EnvelopeInfo.of(read_input(in_path))
    click.echo(json.dumps(info.to_dict(), indent=2, ensure_ascii=False))
