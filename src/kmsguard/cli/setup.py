"""``kmsguard init``: a home directory, a config file and a local key per classification."""

from __future__ import annotations

import os

import click

from kmsguard.cli.io import settings
from kmsguard.config import CONFIG_FILE_NAME
from kmsguard.errors import KeyringError
from kmsguard.keyrings.local import KEY_FILE_NAME, LocalKeyring, key_name_of
from kmsguard.stack import check_local_key_names

_CONFIG_TEMPLATE = """\
# kmsguard configuration. KMSGUARD_* environment variables override these values.
backend = "local"            # "local" (embedded key file) or "aws"
app = "kmsguard"
environment = "development"  # development | staging | production

# Add your own classifications, or tune the defaults:
# [classifications.payment]
# required_context = ["purpose"]
# [classifications.payment.cache]
# max_age = 60
# max_messages = 100
"""


@click.command()
def init() -> None:
    """Create $KMSGUARD_HOME with a config file and a local key per classification."""
    s = settings()
    key_file = s.home / KEY_FILE_NAME
    if key_file.exists():
        raise KeyringError(f"a keyring already exists at {key_file}; refusing to overwrite it")
    if s.backend == "local":
        check_local_key_names(s)  # before anything is written
    config = s.home / CONFIG_FILE_NAME
    try:
        s.home.mkdir(parents=True, exist_ok=True, mode=0o700)
        if s.config_path is None and not config.exists():
            fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(_CONFIG_TEMPLATE)
            click.echo(f"wrote {config}")
    except OSError as exc:
        raise KeyringError(f"cannot set up KMSGUARD_HOME at {s.home}: {exc.strerror}") from None
    if s.backend != "local":
        click.echo(f"backend {s.backend!r}: keys live in the key service; no local keyring created")
        return
    names = sorted({key_name_of(c.key) for c in s.policy})
    LocalKeyring.create(key_file, names, s.passphrase)
    sealed = " (sealed with KMSGUARD_PASSPHRASE)" if s.passphrase else ""
    click.echo(f"wrote {key_file}{sealed}: keys {', '.join(names)}")
