"""``kmsguard encrypt``, ``decrypt`` and ``inspect``: data in, data out, nothing else printed."""

from __future__ import annotations

import json

import click

from kmsguard import envelope
from kmsguard.cli.io import context_option, guard, in_option, out_option, parse_context, read_input, write_output
from kmsguard.guard import EnvelopeInfo


@click.command()
@click.option("--class", "classification", required=True, help="Classification: general, pii, payment, ...")
@context_option
@in_option
@out_option
@click.option("--text", is_flag=True, help="Write the kg1: text form (one line) instead of binary.")
def encrypt(classification: str, context: tuple[str, ...], in_path: str, out_path: str, text: bool) -> None:
    """Encrypt a file or stdin."""
    ctx = parse_context(context)
    plaintext = read_input(in_path)
    with guard() as g:
        sealed = g.encrypt(plaintext, classification, ctx)
    write_output(out_path, (envelope.to_text(sealed) + "\n").encode("ascii") if text else sealed)


@click.command()
@context_option
@in_option
@out_option
def decrypt(context: tuple[str, ...], in_path: str, out_path: str) -> None:
    """Decrypt a binary envelope or a kg1: token from a file or stdin."""
    ctx = parse_context(context)
    data = read_input(in_path)
    with guard() as g:
        write_output(out_path, g.decrypt(envelope.coerce(data), ctx))


@click.command()
@in_option
def inspect(in_path: str) -> None:
    """Show an envelope's header as JSON (decrypts nothing, needs no key)."""
    info = EnvelopeInfo.of(read_input(in_path))
    click.echo(json.dumps(info.to_dict(), indent=2, ensure_ascii=False))
