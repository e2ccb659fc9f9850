"""``kmsguard keys``: list, create, rotate, disable and enable keys of the local keyring."""

from __future__ import annotations

import json

import click

from kmsguard.cli.io import settings
from kmsguard.config import Settings
from kmsguard.errors import ConfigurationError
from kmsguard.keyrings.local import KEY_FILE_NAME, LocalKeyring


def _local(s: Settings) -> LocalKeyring:
    if s.backend != "local":
        raise ConfigurationError(f"backend: this command needs the local backend, not {s.backend!r}")
    return LocalKeyring(s.home / KEY_FILE_NAME, s.passphrase)


def _key_of(s: Settings, classification: str) -> str:
    return s.policy.get(classification).key


@click.group()
def keys() -> None:
    """Manage the keys behind each classification."""


@keys.command("list")
@click.option("--json", "as_json", is_flag=True, help="JSON instead of a table.")
def list_keys(as_json: bool) -> None:
    """Every key version with its state; the primary one encrypts."""
    s = settings()
    versions = _local(s).versions()
    if as_json:
        click.echo(json.dumps([{**vars(v), "key_ref": v.key_ref} for v in versions], indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("key", "version", "state", "primary", "created")
    for v in versions:
        table.add_row(v.name, str(v.version), v.state, "yes" if v.primary else "", v.created)
    Console().print(table)


@keys.command()
@click.option("--class", "classification", required=True)
def create(classification: str) -> None:
    """Create the key of a classification added to the config after init."""
    s = settings()
    info = _local(s).create_key(_key_of(s, classification))
    click.echo(f"created {info.key_ref}")


@keys.command()
@click.option("--class", "classification", required=True)
def rotate(classification: str) -> None:
    """Add a key version and make it primary; older versions keep decrypting."""
    s = settings()
    info = _local(s).rotate(_key_of(s, classification))
    click.echo(f"rotated: {info.key_ref} is now primary")


@keys.command()
@click.option("--class", "classification", required=True)
@click.option("--version", "version", type=click.IntRange(min=1), required=True)
def disable(classification: str, version: int) -> None:
    """Disable a key version: its ciphertexts fail with KEY_DISABLED until re-enabled."""
    s = settings()
    info = _local(s).set_state(_key_of(s, classification), version, enabled=False)
    click.echo(f"disabled {info.key_ref}")


@keys.command()
@click.option("--class", "classification", required=True)
@click.option("--version", "version", type=click.IntRange(min=1), required=True)
def enable(classification: str, version: int) -> None:
    """Re-enable a disabled key version."""
    s = settings()
    info = _local(s).set_state(_key_of(s, classification), version, enabled=True)
    click.echo(f"enabled {info.key_ref}")
