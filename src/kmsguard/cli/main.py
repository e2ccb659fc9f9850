"""The ``kmsguard`` command: a click group whose commands live in sibling modules.

Exit codes: 0 on success; 1 on an operation error, printed as ``error: CODE: message``
on stderr, exactly one line; 2 on a usage error (click's own). No traceback reaches the
user for a kmsguard error, and no error text carries data (see kmsguard.errors).

Everything else kmsguard has to say (a delayed audit delivery, records left in the
spool) goes through ``logging``, shown from the level ``-v``/``--verbose`` or
``KMSGUARD_LOG_LEVEL`` asks for; by default only errors.
"""

from __future__ import annotations

import logging
import os
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


#: ``-v`` shows warnings, ``-vv`` information, ``-vvv`` everything.
_VERBOSITY = (logging.ERROR, logging.WARNING, logging.INFO, logging.DEBUG)


def _log_level(verbose: int) -> int:
    if verbose:
        return _VERBOSITY[min(verbose, len(_VERBOSITY) - 1)]
    name = os.environ.get("KMSGUARD_LOG_LEVEL", "").strip().upper()
    if not name:
        return logging.ERROR
    level = logging.getLevelName(name)
    if not isinstance(level, int):
        raise click.BadParameter(
            f"{name!r} is not a level (DEBUG, INFO, WARNING, ERROR or CRITICAL)", param_hint="KMSGUARD_LOG_LEVEL"
        )
    return level


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="kmsguard")
@click.option("-v", "--verbose", count=True, help="Log warnings (-v), information (-vv), everything (-vvv).")
def cli(verbose: int) -> None:
    """Envelope encryption for general, personal and payment data."""
    level = _log_level(verbose)
    _STDERR.setLevel(level)
    if _STDERR not in logging.root.handlers:
        logging.root.addHandler(_STDERR)  # also keeps logging's last-resort printer away
    if level < logging.WARNING:
        logging.getLogger("kmsguard").setLevel(level)


class _Stderr(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at the time (a test runner swaps it)."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


_STDERR = _Stderr()
_STDERR.setFormatter(logging.Formatter("kmsguard: %(levelname)s: %(message)s"))


def _register() -> None:
    from kmsguard.cli import audit, data, keys, monitoring, rotation, scan, selftest, server, setup
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
    cli.add_command(monitoring.monitoring)
    for command in (field_commands.protect, field_commands.unprotect, field_commands.mask, scan.scan):
        cli.add_command(command)
    cli.add_command(selftest.selftest)
    cli.add_command(selftest.smoke)


def main(argv: list[str] | None = None) -> None:
    _register()
    cli.main(args=argv, prog_name="kmsguard", standalone_mode=True)


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
