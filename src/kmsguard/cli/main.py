"""The ``kmsguard`` command: a click group whose commands live in sibling modules.

Exit codes: 0 on success; 1 on an operation error, printed as ``error: CODE: message``
on stderr, exactly one line; 2 on a usage error (click's own). No traceback reaches the
user for a kmsguard error, and no error text carries data (see kmsguard.errors). Any
other exception (a bug) is ``error: INTERNAL_ERROR: <exception type>``, exit 1: never its
message, which may hold data; its traceback, messages left out, is logged as a warning
(shown with ``-v``).

Everything else kmsguard has to say (a delayed audit delivery, records left in the
spool) goes through ``logging``, shown from the level ``-v``/``--verbose`` or
``KMSGUARD_LOG_LEVEL`` asks for; by default only errors.
"""

from __future__ import annotations

import errno
import importlib
import logging
import os
import sys
import traceback
from typing import Any

import click

from kmsguard import __version__
from kmsguard.errors import KmsGuardError

#: Each command's name, and the module (under kmsguard.cli) and attribute that define it.
#: A module is imported when its command runs or help lists it, so a command loads only
#: what it uses (``encrypt`` neither the service nor the scanners).
COMMANDS: dict[str, tuple[str, str]] = {
    "init": ("setup", "init"),
    **{name: ("data", name) for name in ("encrypt", "decrypt", "inspect", "cat")},
    "keys": ("keys", "keys"),
    **{name: ("rotation", name) for name in ("census", "rewrap", "migrate")},
    "audit": ("audit", "audit"),
    "metrics": ("audit", "metrics"),
    "serve": ("server", "serve"),
    "apikey": ("server", "apikey"),
    "monitoring": ("monitoring", "monitoring"),
    **{name: ("fields", name) for name in ("protect", "unprotect", "mask")},
    "scan": ("scan", "scan"),
    "selftest": ("selftest", "selftest"),
    "smoke": ("selftest", "smoke"),
}


class _Group(click.Group):
    """Loads each command when it is asked for (COMMANDS); turns every KmsGuardError, and
    any other exception but click's own, into one line on stderr and exit status 1."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        module, attribute = COMMANDS[cmd_name]
        command = getattr(importlib.import_module(f"kmsguard.cli.{module}"), attribute)
        assert isinstance(command, click.Command)
        return command

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KmsGuardError as exc:
            click.echo(f"error: {exc.code}: {exc.message}", err=True)
            ctx.exit(1)
        except Exception as exc:
            if isinstance(exc, _CLICK_OWN) or (isinstance(exc, OSError) and exc.errno == errno.EPIPE):
                raise  # usage errors, ctx.exit, Ctrl-C; a closed pipe (`| head`): click ends those itself
            _log.warning("internal error (exception messages left out):\n%s", _traceback(exc))
            click.echo(f"error: INTERNAL_ERROR: {type(exc).__name__}", err=True)
            ctx.exit(1)


_CLICK_OWN = (click.ClickException, click.exceptions.Exit, click.Abort)
_log = logging.getLogger("kmsguard.cli")


def _traceback(exc: BaseException) -> str:
    """``exc``'s traceback and those of its causes, oldest first, each exception named by type only.

    The frames (files, lines, code) help to find the bug; a message could quote the data
    being processed, so none is shown.
    """
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return "\nwhich led to:\n".join(
        "Traceback (most recent call last):\n"
        + "".join(traceback.format_tb(e.__traceback__))
        + f"{type(e).__module__}.{type(e).__qualname__}"
        for e in reversed(chain)
    )


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


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv, prog_name="kmsguard", standalone_mode=True)


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
