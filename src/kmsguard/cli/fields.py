"""``kmsguard protect``, ``unprotect`` and ``mask``: JSON fields of a document or of JSON lines.

A document is read whole from ``--in`` (or stdin) and written as one JSON document. With
``--jsonl`` each line is one record and each output line one result, in order, streamed
(memory stays flat on any input size); a record
that fails becomes ``{"line": N, "error": {...}}`` and the stream goes on (exit 1 at the
end). Error messages name paths and lines, never values. ``mask`` uses no key, so it
works without ``kmsguard init``.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from typing import Any

import click

from kmsguard import fields as field_ops
from kmsguard.cli.io import context_option, guard, in_option, out_option, parse_context, read_input, write_output
from kmsguard.errors import InvalidInput, KmsGuardError
from kmsguard.masking import NAMED_RULES

jsonl_option = click.option("--jsonl", is_flag=True, help="One JSON record per line in, one result per line out.")


def _pairs(values: tuple[str, ...], option: str) -> dict[str, str]:
    """``PATH=VALUE`` options; split at the last ``=``, since a JSONPath filter may hold ``==``."""
    out: dict[str, str] = {}
    for item in values:
        path, _, value = item.rpartition("=")
        if not path or not value:
            raise click.BadParameter(f"expected PATH=VALUE, got {item!r}", param_hint=option)
        out[path] = value
    return out


def _run(in_path: str, out_path: str, jsonl: bool, transform: Callable[[Any], Any]) -> None:
    if not jsonl:
        try:
            record = json.loads(read_input(in_path))
        except (UnicodeDecodeError, ValueError):
            raise InvalidInput("the input is not a JSON document") from None
        write_output(out_path, (json.dumps(transform(record), ensure_ascii=False) + "\n").encode("utf-8"))
        return
    try:
        source = sys.stdin.buffer if in_path == "-" else open(in_path, "rb")  # noqa: SIM115
        sink = sys.stdout if out_path == "-" else os.fdopen(_create(out_path), "w", encoding="utf-8")
    except OSError as exc:
        raise click.FileError(exc.filename or in_path, exc.strerror) from None
    failures = 0
    try:
        for n, raw in enumerate(source, start=1):
            if not raw.strip():
                continue
            try:
                try:
                    record = json.loads(raw)
                except (UnicodeDecodeError, ValueError):
                    raise InvalidInput("not a JSON value") from None
                result = transform(record)
            except KmsGuardError as exc:
                failures += 1
                result = {"line": n, "error": exc.to_dict()}
            sink.write(json.dumps(result, ensure_ascii=False) + "\n")
    finally:
        for stream in (source, sink):
            if stream not in (sys.stdin.buffer, sys.stdout):
                stream.close()
    if failures:
        click.echo(f"{failures} record(s) failed; see their error records", err=True)
        sys.exit(1)


def _create(path: str) -> int:
    """A new or truncated output file with mode 0600: it may hold plaintext."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)


@click.command()
@click.option("--field", "field_specs", multiple=True, metavar="PATH=CLASS", help="A JSONPath and its classification.")
@click.option(
    "--index", "indexes", multiple=True, metavar="PATH=NAME", help="Also write a blind index NAME beside PATH."
)
@click.option("--detect", is_flag=True, help="Also protect every value detection finds, under its suggested class.")
@click.option("--keep", multiple=True, metavar="PATH", help="With --detect: leave values under PATH as they are.")
@click.option("--ignore-missing", is_flag=True, help="Skip a --field path that matches nothing instead of failing.")
@context_option
@in_option
@out_option
@jsonl_option
def protect(
    field_specs: tuple[str, ...],
    indexes: tuple[str, ...],
    detect: bool,
    keep: tuple[str, ...],
    ignore_missing: bool,
    context: tuple[str, ...],
    in_path: str,
    out_path: str,
    jsonl: bool,
) -> None:
    """Encrypt the selected fields of a JSON document (or JSON lines) into kg1: tokens."""
    chosen: dict[str, Any] = dict(_pairs(field_specs, "--field"))
    for path, name in _pairs(indexes, "--index").items():
        if path not in chosen:
            raise click.BadParameter(f"{path} is not a --field path", param_hint="--index")
        chosen[path] = {"class": chosen[path], "index": name}
    if not chosen and not detect:
        raise click.UsageError("give at least one --field PATH=CLASS, or --detect")
    ctx = parse_context(context)
    missing = "ignore" if ignore_missing else "error"
    with guard() as g:
        _run(
            in_path,
            out_path,
            jsonl,
            lambda r: field_ops.protect(g, r, chosen, ctx, missing=missing, detect=detect, keep=keep),
        )


@click.command()
@click.option("--field", "paths", multiple=True, metavar="PATH", help="Only restore tokens at PATH (default: all).")
@context_option
@in_option
@out_option
@jsonl_option
def unprotect(paths: tuple[str, ...], context: tuple[str, ...], in_path: str, out_path: str, jsonl: bool) -> None:
    """Restore the fields that protect encrypted."""
    ctx = parse_context(context)
    with guard() as g:
        _run(in_path, out_path, jsonl, lambda r: field_ops.unprotect(g, r, ctx, paths=list(paths) or None))


@click.command()
@click.option(
    "--field",
    "field_specs",
    multiple=True,
    required=True,
    metavar="PATH[=RULE]",
    help="A JSONPath to mask; RULE is erase, last4 or email (default: by the value's detected kind).",
)
@in_option
@out_option
@jsonl_option
def mask(field_specs: tuple[str, ...], in_path: str, out_path: str, jsonl: bool) -> None:
    """Irreversibly mask fields for logs and support screens (uses no key)."""
    paths, rules = [], {}
    for item in field_specs:
        path, _, rule = item.rpartition("=")
        if path and rule in NAMED_RULES:
            rules[path] = rule
        else:
            path = item
        paths.append(path)
    _run(in_path, out_path, jsonl, lambda r: field_ops.mask(r, paths, rules))
