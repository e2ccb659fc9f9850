"""The ``kmsguard`` command: a click group whose commands live in sibling modules.

Exit codes: 0 on success; 1 on an operation error, printed as ``error: CODE: message``
on stderr; 2 on a usage error (click's own). No traceback reaches the user for a
kmsguard error, and no error text carries data (see kmsguard.errors).
"""

from __future__ import annotations

import sys
from typing import Any

import click

from kmsguard import __version__
from kmsguard.errors import KmsGuardError


class _Group(click.Group):
    """Turns every KmsGuardError into one line on stderr and exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KmsGuardError as exc:
            click.echo(f"error: {exc.code}: {exc.message}", err=True)
            ctx.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="kmsguard")
def cli() -> None:
    """Envelope encryption for general, personal and payment data."""


def _register() -> None:
    from kmsguard.cli import audit, data, keys, rotation, scan, server, setup
    from kmsguard.cli import fields as field_commands

    cli.add_command(setup.init)
    for command in (data.encrypt, data.decrypt, data.inspect, data.cat):
        cli.add_command(command)
    cli.add_command(keys.keys)
    for command in (rotation.census, rotation.rewrap, rotation.migrate):
        cli.add_command(command)
    cli.add_command(audit.audit)
    cli.add_command(audit.metrics)
    cli.add_command(server.serve)
    cli.add_command(server.apikey)
    for command in (field_commands.protect, field_commands.unprotect, field_commands.mask, scan.scan):
        cli.add_command(command)


def main(argv: list[str] | None = None) -> None:
    _register()
    cli.main(args=argv, prog_name="kmsguard", standalone_mode=True)


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
