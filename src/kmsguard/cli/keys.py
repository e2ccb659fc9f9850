"""``kmsguard keys``: the keys behind each classification, for either backend.

Each command dispatches on ``backend``: the local keyring's versioned keys, or the
AWS KMS keys named by the policy (through :class:`kmsguard.aws.admin.KeyAdmin`).
Commands that make sense for one backend only say so with a CONFIGURATION_ERROR.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import click

from kmsguard.audit.admin import audited
from kmsguard.cli.io import settings
from kmsguard.config import Settings
from kmsguard.errors import ConfigurationError, InvalidInput
from kmsguard.keyrings.local import KEY_FILE_NAME, LocalKeyring, key_name_of

if TYPE_CHECKING:
    from kmsguard.aws.admin import KeyAdmin

class_option = click.option("--class", "classification", required=True, help="The classification whose key to use.")
json_option = click.option("--json", "as_json", is_flag=True, help="JSON instead of a table.")


def _local(s: Settings) -> LocalKeyring:
    if s.backend != "local":
        raise ConfigurationError(f"backend: this command needs the local backend, not {s.backend!r}")
    return LocalKeyring(s.home / KEY_FILE_NAME, s.passphrase)


def _aws(s: Settings) -> KeyAdmin:
    from kmsguard.aws import AwsSettings, ClientFactory
    from kmsguard.aws.admin import KeyAdmin

    return KeyAdmin(ClientFactory(AwsSettings.from_section(s.section("aws"), s.env, s.environment)))


def _audited(s: Settings, name: str, classification: str) -> Any:
    """Local key changes are audited like data operations, strictly (see kmsguard.audit.admin).

    AWS KMS records its own key management (CreateKey, RotateKeyOnDemand...) in CloudTrail.
    """
    return audited(s, _local(s), name, classification)


def _key_of(s: Settings, classification: str) -> str:
    return s.policy.get(classification).key


def _table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(*columns)
    for row in rows:
        table.add_row(*row)
    console = Console()
    if not console.is_terminal:
        console.width = 240  # piped or captured: never squeeze ARNs to fit 80 columns
    console.print(table)


@click.group()
def keys() -> None:
    """Manage the keys behind each classification."""


@keys.command("list")
@json_option
def list_keys(as_json: bool) -> None:
    """Every local key version with its state; the primary one encrypts (local backend)."""
    s = settings()
    versions = _local(s).versions()
    if as_json:
        click.echo(json.dumps([{**vars(v), "key_ref": v.key_ref} for v in versions], indent=2))
        return
    _table(
        ("key", "version", "state", "primary", "created"),
        [(v.name, str(v.version), v.state, "yes" if v.primary else "", v.created) for v in versions],
    )


@keys.command()
@json_option
@click.option("--strict", is_flag=True, help="Exit 1 when a key is not enabled or (AWS) not rotating.")
def status(as_json: bool, strict: bool) -> None:
    """Per classification: the key, its state and its rotation."""
    s = settings()
    rows = _local_status(s) if s.backend == "local" else [r.to_dict() for r in _aws(s).status(s.policy)]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    elif s.backend == "local":
        _table(
            ("class", "key", "primary", "state"),
            [(r["classification"], r["key"], r["primary"], r["state"]) for r in rows],
        )
    else:
        _table(
            ("class", "region", "key ARN", "state", "spec", "usage", "multi-region", "rotation", "period", "next"),
            [_aws_row(r) for r in rows],
        )
    _census_status(s, as_json)
    if strict and not all(r["healthy"] for r in rows):
        click.echo(_not_ready(rows), err=True)
        click.get_current_context().exit(1)


def _not_ready(rows: list[dict[str, Any]]) -> str:
    """``not ready: general (Disabled), pii (ACCESS_DENIED)``: each unhealthy class and why.

    Why is the key's state (``Disabled``, ``PendingDeletion``; local: ``missing``,
    ``disabled``), ``not rotating``, or the error code when the key service could not be
    asked (the cause is then KMS, not the key). With several regions each reason names its
    region. One line, like every CLI failure.
    """
    several = len({r.get("region") for r in rows}) > 1
    reasons: dict[str, dict[str, None]] = {}
    for r in rows:
        if r["healthy"]:
            continue
        if r.get("error"):
            reason = r["error"]
        elif r["state"] not in ("Enabled", "enabled"):
            reason = str(r["state"])
        else:
            reason = "not rotating"
        if several:
            reason = f"{r['region']}: {reason}"
        reasons.setdefault(r["classification"], {})[reason] = None
    return "not ready: " + ", ".join(f"{c} ({'; '.join(why)})" for c, why in sorted(reasons.items()))


def _census_status(s: Settings, as_json: bool) -> None:
    """The last recorded census of each source, per classification and key (stderr with --json)."""
    from kmsguard.rotation.census import recorded

    censuses = recorded(s.home)
    if not censuses:
        return
    rows = [
        (g["classification"], "\n".join(g["keys"]), str(g["count"]), c.source, c.at)
        for c in censuses
        for g in c.to_dict()["groups"]
    ] + [("(not envelopes)", "-", str(c.not_envelopes), c.source, c.at) for c in censuses if c.not_envelopes]
    if as_json:
        click.echo(json.dumps({"census": [c.to_dict() for c in censuses]}, indent=2), err=True)
        return
    click.echo("last census per source:")
    _table(("class", "keys", "count", "source", "at"), sorted(rows))


def _local_status(s: Settings) -> list[dict[str, Any]]:
    versions = _local(s).versions()
    rows = []
    for cls in s.policy:
        name = key_name_of(cls.key)
        primary = next((v for v in versions if v.name == name and v.primary), None)
        state = primary.state if primary else "missing"
        rows.append(
            {
                "classification": cls.name,
                "key": cls.key,
                "primary": primary.key_ref if primary else "-",
                "state": state,
                "healthy": state == "enabled",
            }
        )
    return rows


def _aws_row(r: dict[str, Any]) -> tuple[str, ...]:
    def show(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, bool):
            return "yes" if value else "no"
        return str(value)

    state = r["state"] if r["error"] is None else r["error"]
    return (
        r["classification"],
        r["region"],
        show(r["arn"] or r["key"]),
        show(state),
        show(r["spec"]),
        show(r["usage"]),
        show(r["multi_region"]),
        show(r["rotation_enabled"]),
        show(r["rotation_period_days"]),
        show(r["next_rotation"]),
    )


@keys.command()
@class_option
@click.option("--multi-region", is_flag=True, help="AWS: a multi-region key, replicated to every configured region.")
@click.option(
    "--alias", default=None, help="AWS: the alias to create (default: the classification's configured alias)."
)
def create(classification: str, multi_region: bool, alias: str | None) -> None:
    """Create the key of a classification (a new account, a test endpoint, a class added after init)."""
    s = settings()
    key = _key_of(s, classification)
    if s.backend == "local":
        if multi_region or alias:
            raise InvalidInput("--multi-region and --alias apply to the aws backend only")
        with _audited(s, "keys.create", classification) as op:
            op.key_refs.append(_local(s).create_key(key).key_ref)
        click.echo(f"created {op.key_refs[0]}")
        return
    if alias is None and key.startswith("alias/"):
        alias = key
    for arn in _aws(s).create(classification, alias, multi_region=multi_region, app=s.app, environment=s.environment):
        click.echo(f"created {arn}" + (f" as {alias}" if alias else "") + " (automatic rotation on)")


@keys.command()
@class_option
def rotate(classification: str) -> None:
    """Rotate now: local adds a version and makes it primary; AWS calls RotateKeyOnDemand.

    Older key material keeps decrypting in both cases.
    """
    s = settings()
    if s.backend == "local":
        with _audited(s, "keys.rotate", classification) as op:
            info = _local(s).rotate(_key_of(s, classification))
            op.key_refs.append(info.key_ref)
        click.echo(f"rotated: {info.key_ref} is now primary")
        return
    arn = _aws(s).rotate(_key_of(s, classification))
    click.echo(f"rotation started for {arn}")


@keys.command("enable-rotation")
@class_option
@click.option("--period-days", type=click.IntRange(90, 2560), default=None, help="Days between rotations (AWS).")
def enable_rotation(classification: str, period_days: int | None) -> None:
    """Turn on AWS KMS automatic rotation for a classification's key, in every region (aws backend)."""
    s = settings()
    if s.backend != "aws":
        raise ConfigurationError("backend: automatic rotation is an AWS KMS feature; use 'kmsguard keys rotate'")
    for arn in _aws(s).enable_rotation(_key_of(s, classification), period_days):
        click.echo(f"automatic rotation enabled for {arn}" + (f" every {period_days} days" if period_days else ""))


@keys.command()
@class_option
@click.option("--version", "version", type=click.IntRange(min=1), required=True)
def disable(classification: str, version: int) -> None:
    """Disable a local key version: its ciphertexts fail with KEY_DISABLED until re-enabled."""
    s = settings()
    with _audited(s, "keys.disable", classification) as op:
        info = _local(s).set_state(_key_of(s, classification), version, enabled=False)
        op.key_refs.append(info.key_ref)
    click.echo(f"disabled {info.key_ref}")


@keys.command()
@class_option
@click.option("--version", "version", type=click.IntRange(min=1), required=True)
def enable(classification: str, version: int) -> None:
    """Re-enable a disabled local key version."""
    s = settings()
    with _audited(s, "keys.enable", classification) as op:
        info = _local(s).set_state(_key_of(s, classification), version, enabled=True)
        op.key_refs.append(info.key_ref)
    click.echo(f"enabled {info.key_ref}")


source_option = click.option(
    "--source",
    "sources",
    multiple=True,
    metavar="SOURCE",
    help="Take (and record) a census of this source first; repeat for more. Default: the recorded censuses.",
)


@keys.command()
@click.option("--class", "classification", default=None, help="Local: the classification whose key version to retire.")
@click.option("--version", "version", type=click.IntRange(min=1), default=None, help="Local: the version to retire.")
@click.option("--key", "key_arn", default=None, help="AWS: the old key's ARN, as the census shows it.")
@source_option
@click.option("--force", is_flag=True, help="Retire although a census counts envelopes under the key (or none exists).")
@click.option(
    "--schedule-deletion",
    "deletion_days",
    type=click.IntRange(7, 30),
    default=None,
    help="AWS: also schedule the key's deletion after DAYS (7-30).",
)
def retire(
    classification: str | None,
    version: int | None,
    key_arn: str | None,
    sources: tuple[str, ...],
    force: bool,
    deletion_days: int | None,
) -> None:
    """Retire an old key once a census shows nothing stored under it.

    Local (--class, --version): the version's key material is erased for good; it stays
    listed as retired. AWS (--key ARN): DisableKey, and with --schedule-deletion
    ScheduleKeyDeletion. Refused while a census counts envelopes under the key.
    """
    from kmsguard.rotation.retire import evidence, region_of

    s = settings()
    if s.backend == "local":
        if classification is None or version is None or key_arn or deletion_days:
            raise InvalidInput(
                "the local backend retires with --class and --version (--key and --schedule-deletion are AWS)"
            )
        ref = f"local:{key_name_of(_key_of(s, classification))}:v{version}"
        evidence(s.home, ref, sources).check(force)
        with _audited(s, "keys.retire", classification) as op:
            info = _local(s).retire(_key_of(s, classification), version)
            op.key_refs.append(info.key_ref)
        click.echo(f"retired {info.key_ref}: its key material is erased")
        return
    if key_arn is None or classification or version:
        raise InvalidInput("the aws backend retires with --key ARN (--class and --version are local)")
    region = region_of(key_arn)
    evidence(s.home, key_arn, sources).check(force)
    admin = _aws(s)
    key_id = key_arn.rsplit("/", 1)[1]  # DisableKey works in the caller's account only: the id suffices
    admin.clients.call(region, "DisableKey", key_ref=key_arn, KeyId=key_id)
    click.echo(f"disabled {key_arn}")
    if deletion_days is not None:
        out = admin.clients.call(
            region, "ScheduleKeyDeletion", key_ref=key_arn, KeyId=key_id, PendingWindowInDays=deletion_days
        )
        click.echo(f"deletion scheduled for {out.get('DeletionDate')}")


@keys.command("min-decrypt-version")
@class_option
@click.option("--version", "version", type=click.IntRange(min=1), required=True)
def min_decrypt_version(classification: str, version: int) -> None:
    """Refuse to decrypt under versions older than VERSION (local); nothing is erased, 1 undoes it."""
    s = settings()
    with _audited(s, "keys.min-decrypt-version", classification) as op:
        _local(s).set_min_decrypt_version(_key_of(s, classification), version)
        op.key_refs.append(f"local:{key_name_of(_key_of(s, classification))}:v{version}")
    click.echo(f"{classification}: versions below {version} no longer decrypt")
