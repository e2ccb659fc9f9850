"""``kmsguard serve`` and ``kmsguard apikey``: the HTTP service and its API keys."""

from __future__ import annotations

import datetime
import json
from typing import TYPE_CHECKING, Any

import click

from kmsguard.cli.io import settings
from kmsguard.errors import InvalidInput

if TYPE_CHECKING:
    from kmsguard.server.apikeys import KeyStore


@click.command()
@click.option("--host", default=None, help="Address to listen on ([server] host; default 127.0.0.1).")
@click.option("--port", type=int, default=None, help="Port ([server] port; default 8080).")
@click.option("--workers", type=int, default=None, help="Worker processes ([server] workers; default 1).")
@click.option("--ssl-keyfile", default=None, help="Serve HTTPS with this private key (uvicorn's own option).")
@click.option("--ssl-certfile", default=None, help="...and this certificate chain.")
def serve(
    host: str | None, port: int | None, workers: int | None, ssl_keyfile: str | None, ssl_certfile: str | None
) -> None:
    """Run the HTTP encryption service (needs kmsguard[server]). Stops gracefully on SIGTERM."""
    from kmsguard.server.run import serve as run

    if (ssl_keyfile is None) != (ssl_certfile is None):
        raise InvalidInput("--ssl-keyfile and --ssl-certfile go together")
    tls = {"ssl_keyfile": ssl_keyfile, "ssl_certfile": ssl_certfile} if ssl_keyfile else {}
    run({"host": host, "port": port, "workers": workers}, tls)


@click.group()
def apikey() -> None:
    """Create, list and revoke the service's API keys ([server] api_keys: file or postgres)."""


def _store() -> KeyStore:
    from kmsguard.server.apikeys import open_store
    from kmsguard.server.settings import ServerSettings

    s = settings()
    server = ServerSettings.of(s)
    return open_store(server.api_keys, s.home, server.api_keys_dsn, server.api_keys_schema)


@apikey.command("create")
@click.option("--name", required=True, help="Unique name; the principal of the key's audit records.")
@click.option(
    "--allow",
    "scopes",
    multiple=True,
    metavar="OP:CLASS",
    help="A scope; repeat for more. OP: encrypt, decrypt, rewrap, inspect or admin; CLASS: a classification or *.",
)
def create(name: str, scopes: tuple[str, ...]) -> None:
    """Make a key and print its token: the only time it is shown (only its hash is stored)."""
    from kmsguard.server.apikeys import create_key

    click.echo(create_key(_store(), name, scopes))


@apikey.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per key.")
def list_keys(as_json: bool) -> None:
    """Names, scopes, created, last used and revoked times (never tokens or hashes)."""
    for key in _store().load():
        row: dict[str, Any] = {
            "name": key.name,
            "scopes": [str(s) for s in key.scopes],
            "created": _when(key.created),
            "last_used": _when(key.last_used),
            "revoked": _when(key.revoked),
        }
        if as_json:
            click.echo(json.dumps(row))
        else:
            state = f"revoked {row['revoked']}" if key.revoked else f"last used {row['last_used'] or 'never'}"
            click.echo(f"{key.name}\t{' '.join(row['scopes'])}\tcreated {row['created']}\t{state}")


@apikey.command("revoke")
@click.argument("name")
def revoke(name: str) -> None:
    """Revoke key NAME: every worker refuses it within seconds."""
    if not _store().revoke(name):
        raise InvalidInput(f"no live API key named {name!r}")
    click.echo(f"revoked {name}")


def _when(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
