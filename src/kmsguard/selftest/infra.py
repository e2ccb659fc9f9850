"""Checks of the deployment's parts: credentials, keys, connectivity (config is the runner's).

Each check adds one result per subject (a classification, a region, ``class@region``)
and never raises: a failure is a result.
"""

from __future__ import annotations

import stat
import time
from datetime import UTC, datetime
from typing import Any

from kmsguard.errors import KmsGuardError
from kmsguard.keyrings.local import KEY_FILE_NAME, LocalKeyring, key_name_of
from kmsguard.selftest.report import Timer
from kmsguard.selftest.run import Run, describe

#: Codes that mean the key service never answered (as opposed to answering with a refusal).
UNREACHABLE = frozenset({"KMS_TIMEOUT", "KMS_SERVICE_ERROR"})

CREDENTIALS = "credentials"
KEYS = "keys"
CONNECTIVITY = "connectivity"


# ---------------------------------------------------------------------- credentials


def credentials(run: Run) -> None:
    """AWS: STS GetCallerIdentity names the account and the identity; short-lived credentials warn."""
    title = "AWS credentials resolve to an identity"
    if not run.aws:
        run.add(CREDENTIALS, title, "skip", "local backend: no AWS credentials are used", critical=True)
        return
    timer = Timer()
    try:
        identity, expiry = _caller_identity(run)
    except Exception as exc:
        run.add(CREDENTIALS, title, "fail", _sts_error(exc), critical=True, timer=timer)
        return
    who = _identity_name(str(identity.get("Arn", "")))
    detail = f"account {identity.get('Account', '?')}, {who}"
    if expiry is not None:
        minutes = (expiry - datetime.now(UTC)).total_seconds() / 60
        if minutes < run.options.credentials_warn_minutes:
            run.add(CREDENTIALS, title, "warn", f"{detail}; temporary credentials expire in {minutes:.0f} min",
                    critical=True, timer=timer)
            return
        detail += f"; temporary credentials valid for {minutes:.0f} min"
    run.add(CREDENTIALS, title, "pass", detail, critical=True, timer=timer)


def _caller_identity(run: Run) -> tuple[dict[str, Any], datetime | None]:
    from botocore.config import Config

    aws = run.aws_settings()
    session = run.factory().session()
    env = run.settings.env
    endpoint = None
    if (env.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS") or "").lower() != "true":
        endpoint = env.get("AWS_ENDPOINT_URL_STS") or env.get("AWS_ENDPOINT_URL") or None
    sts = session.client(
        "sts",
        region_name=aws.region,
        endpoint_url=endpoint,
        config=Config(
            connect_timeout=aws.connect_timeout,
            read_timeout=aws.read_timeout,
            retries={"mode": "standard", "total_max_attempts": aws.max_attempts},
        ),
    )
    try:
        identity: dict[str, Any] = sts.get_caller_identity()
    finally:
        sts.close()
    creds = session.get_credentials()
    expiry = getattr(creds, "_expiry_time", None)  # set for refreshable (temporary) credentials only
    return identity, expiry if isinstance(expiry, datetime) else None


def _identity_name(arn: str) -> str:
    """``role <name>`` for an assumed role, ``user <name>`` for an IAM user, else the ARN's resource."""
    resource = arn.split(":", 5)[-1] if arn.count(":") >= 5 else arn
    kind, _, rest = resource.partition("/")
    if kind == "assumed-role":
        return f"role {rest.split('/', 1)[0]}"
    if kind in ("user", "role"):
        return f"{kind} {rest.rsplit('/', 1)[-1]}"
    return resource or "an unnamed identity"


def _sts_error(exc: BaseException) -> str:
    from botocore import exceptions as bx

    if isinstance(exc, bx.ClientError):
        code = exc.response.get("Error", {}).get("Code", "?")
        return f"STS GetCallerIdentity refused: {code}"
    if isinstance(exc, bx.NoCredentialsError):
        return "no credentials in the AWS credential chain (environment, profile, SSO, instance role)"
    if isinstance(exc, bx.BotoCoreError):
        return f"STS GetCallerIdentity failed: {type(exc).__name__}"
    return f"STS GetCallerIdentity failed: {describe(exc)}"


# ---------------------------------------------------------------------- keys


def keys(run: Run) -> None:
    """Each classification's key: present, enabled, usable for envelope encryption, rotating."""
    if run.aws:
        _aws_keys(run)
    else:
        _local_keys(run)


def _aws_keys(run: Run) -> None:
    from kmsguard.aws.admin import KeyAdmin

    title = "the key exists, is enabled, symmetric, ENCRYPT_DECRYPT, rotating"
    try:
        admin = KeyAdmin(run.factory())
    except Exception as exc:
        run.add(KEYS, title, "fail", describe(exc), critical=True)
        return
    for cls in run.classes:
        timer = Timer()
        rows = admin.status([cls])
        for row in rows:
            subject = f"{cls.name}@{row.region}"
            name = row.arn or row.key
            if row.error is not None:
                run.add(KEYS, title, "fail", f"{row.error}: {name} cannot be described", critical=True,
                        subject=subject, timer=timer)
            elif row.state != "Enabled":
                run.add(KEYS, title, "fail", f"{name} is {row.state}", critical=True, subject=subject, timer=timer)
            elif row.spec != "SYMMETRIC_DEFAULT" or row.usage != "ENCRYPT_DECRYPT":
                run.add(KEYS, title, "fail", f"{name} is {row.spec}/{row.usage}, not SYMMETRIC_DEFAULT/ENCRYPT_DECRYPT",
                        critical=True, subject=subject, timer=timer)
            elif row.rotation_enabled is False:
                strict = run.strict and run.production
                run.add(KEYS, title, "fail" if strict else "warn", f"{name}: automatic rotation is off "
                        f"(kmsguard keys enable-rotation --class {cls.name})", critical=True, subject=subject,
                        timer=timer)
            else:
                rotation = (
                    f"rotation every {row.rotation_period_days or 365} days" if row.rotation_enabled
                    else "rotation managed outside KMS"
                )
                kind = "multi-region key" if row.multi_region else "key"
                run.add(KEYS, title, "pass", f"{kind} {name}: Enabled, SYMMETRIC_DEFAULT, ENCRYPT_DECRYPT, {rotation}",
                        critical=True, subject=subject, timer=timer)
            timer = Timer()


def _local_keys(run: Run) -> None:
    title = "the key file is private; every unretired key version is enabled"
    path = run.settings.home / KEY_FILE_NAME
    timer = Timer()
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        run.add(KEYS, title, "fail", f"no key file at {path} (kmsguard init)", critical=True, timer=timer)
        return
    if mode & 0o077:
        run.add(KEYS, title, "fail", f"{path} has mode {mode:04o}; it must be 0600", critical=True, subject="key file",
                timer=timer)
    else:
        run.add(KEYS, title, "pass", f"{path} has mode {mode:04o}", critical=True, subject="key file", timer=timer)
    timer = Timer()
    try:
        versions = LocalKeyring(path, run.settings.passphrase).versions()
    except Exception as exc:
        run.add(KEYS, title, "fail", describe(exc), critical=True, timer=timer)
        return
    for cls in run.classes:
        name = key_name_of(cls.key)
        primary = next((v for v in versions if v.name == name and v.primary), None)
        disabled = [v.key_ref for v in versions if v.name == name and v.state == "disabled"]
        if primary is None:
            run.add(KEYS, title, "fail", f"no key named {name} (kmsguard keys create --class {cls.name})",
                    critical=True, subject=cls.name, timer=timer)
        elif primary.state != "enabled":
            run.add(KEYS, title, "fail", f"the primary version {primary.key_ref} is {primary.state}", critical=True,
                    subject=cls.name, timer=timer)
        elif disabled:
            # A disabled version still holds envelopes' keys (else it would be retired): they all fail now.
            run.add(KEYS, title, "fail", f"{', '.join(disabled)} disabled: envelopes under it fail with KEY_DISABLED "
                    "(kmsguard keys enable, or keys retire once a census finds none)", critical=True,
                    subject=cls.name, timer=timer)
        else:
            run.add(KEYS, title, "pass", f"{primary.key_ref} enabled (primary)", critical=True, subject=cls.name,
                    timer=timer)
        timer = Timer()


# ---------------------------------------------------------------------- connectivity


def connectivity(run: Run) -> None:
    """One KMS call per region and its latency; critical only when no region answers.

    Any answer counts, a refusal too (ACCESS_DENIED, KEY_NOT_FOUND...): the keys check
    judges the key; this one judges the path to the service.
    """
    title = "KMS answers in each region"
    if not run.aws:
        run.add(CONNECTIVITY, title, "skip", "local backend: no key service to reach", critical=False)
        return
    try:
        regions = run.aws_settings().regions
        factory = run.factory()
    except Exception as exc:
        run.add(CONNECTIVITY, title, "fail", describe(exc), critical=True)
        return
    key = run.classes[0].key if run.classes else "alias/aws/kms"
    outcomes: list[tuple[str, str | None, float, str]] = []
    for region in regions:
        started = time.perf_counter()
        try:
            factory.call(region, "DescribeKey", key_ref=key, KeyId=key)
            code: str | None = None
            message = ""
        except KmsGuardError as exc:
            code, message = exc.code, exc.message
        outcomes.append((region, code, (time.perf_counter() - started) * 1000, message))
    answered = [o for o in outcomes if o[1] not in UNREACHABLE]
    for region, code, ms, message in outcomes:
        if code in UNREACHABLE:
            run.add(CONNECTIVITY, title, "fail", f"{code}: {message}", critical=not answered, subject=region, ms=ms)
        else:
            note = f" (it refused the call: {code})" if code else ""
            run.add(CONNECTIVITY, title, "pass", f"KMS answered in {ms:.1f} ms{note}", critical=not answered,
                    subject=region, ms=ms)
