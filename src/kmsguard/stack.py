"""Builds what Settings ask for: the keyring stack and the operation observers.

This is the composition root behind ``Guard.from_env()``: the only module that knows
which concrete keyrings and observers exist. Backends are imported lazily, so a local
setup never imports boto3.

Every stack gets a data-key cache in front of its backend (``CachingKeyring``), with
each classification's ``cache`` limits from the policy; a classification turns it off
with ``reuse = false`` (encrypt) and ``decrypt_ttl = 0`` (decrypt).
"""

from __future__ import annotations

from dataclasses import replace

from kmsguard.config import Settings
from kmsguard.errors import ConfigurationError, InvalidInput
from kmsguard.keyrings.base import Keyring
from kmsguard.keyrings.caching import CachingKeyring
from kmsguard.keyrings.local import KEY_FILE_NAME, LocalKeyring, key_name_of
from kmsguard.operation import Observer
from kmsguard.policy import Policy
from kmsguard.telemetry import NULL_TELEMETRY, Telemetries, Telemetry


def build_policy(settings: Settings) -> Policy:
    """The policy Guard applies: the settings' classifications, with ``[audit] strict`` (when
    set) overriding every classification's ``strict_audit``."""
    from kmsguard.audit.settings import AuditSettings

    strict = AuditSettings.of(settings).strict
    if strict is None:
        return settings.policy
    return Policy([replace(cls, strict_audit=strict) for cls in settings.policy])


def build_telemetry(settings: Settings) -> Telemetry:
    """The one Telemetry of a stack: the metrics registry (``[metrics] enabled``, default on), and the
    OpenTelemetry bridge when it is on (``[metrics] otel``), both fed by a Telemetries."""
    from kmsguard.metrics import build_metrics, build_otel

    registry = build_metrics(settings)
    parts = [t for t in (registry, build_otel(settings)) if t is not None]
    if len(parts) > 1:
        telemetry = Telemetries(parts)
        if registry is not None and registry.exporter is not None:  # the registry's export's drops, to all
            registry.exporter.on_drop = telemetry.export_dropped
        return telemetry
    return parts[0] if parts else NULL_TELEMETRY


def build_keyring(settings: Settings, telemetry: Telemetry = NULL_TELEMETRY) -> Keyring:
    """The backend keyring behind a data-key cache."""
    return CachingKeyring(
        _backend_keyring(settings, telemetry),
        settings.policy,
        max_entries=settings.cache_max_entries,
        telemetry=telemetry,
    )


def backend_keyring(settings: Settings, telemetry: Telemetry = NULL_TELEMETRY) -> Keyring:
    """The backend alone, without the cache (for a caller that composes its own stack around it)."""
    return _backend_keyring(settings, telemetry)


def _backend_keyring(settings: Settings, telemetry: Telemetry = NULL_TELEMETRY) -> Keyring:
    if settings.backend == "local":
        check_local_key_names(settings)
        return LocalKeyring(settings.home / KEY_FILE_NAME, settings.passphrase)
    if settings.backend == "aws":
        return build_aws_keyring(settings, telemetry)
    raise ConfigurationError(f"backend: {settings.backend!r} is not available in this build")


def build_aws_keyring(settings: Settings, telemetry: Telemetry = NULL_TELEMETRY) -> Keyring:
    """AWS KMS through one shared client factory: one region, or several with failover.

    With one region and no per-region keys this is a plain AwsKmsKeyring; otherwise a
    MultiRegionKeyring over one AwsKmsKeyring per region, in ``[aws] regions`` order.
    """
    from kmsguard.aws import AwsSettings, ClientFactory
    from kmsguard.keyrings.aws_kms import AwsKmsKeyring
    from kmsguard.keyrings.multi_region import MultiRegionKeyring, MultiRegionOptions

    section = settings.section("aws")
    aws = AwsSettings.from_section(section, settings.env, settings.environment)
    options = MultiRegionOptions.from_section(section)
    factory = ClientFactory(aws, telemetry)
    if len(aws.regions) == 1 and not options.region_keys:
        return AwsKmsKeyring(factory, aws.region)
    return MultiRegionKeyring(
        {region: AwsKmsKeyring(factory, region) for region in aws.regions},
        region_keys=options.region_keys,
        class_regions={c.name: c.regions for c in settings.policy if c.regions},
        wrap_in_all_regions=options.wrap_in_all_regions,
        failures=options.breaker_failures,
        cooldown=options.breaker_cooldown,
        operation_timeout=aws.operation_timeout,
        hedge=options.hedge,
        max_in_flight=aws.max_pool_connections,
        telemetry=telemetry,
    )


def check_local_key_names(settings: Settings) -> None:
    """A key the local keyring cannot name (an AWS alias, say) is a configuration error, found now."""
    for cls in settings.policy:
        try:
            key_name_of(cls.key)
        except InvalidInput:
            raise ConfigurationError(
                f"classifications.{cls.name}.key (or KMSGUARD_KEY_{cls.name.upper().replace('-', '_')}): "
                f"{cls.key!r} is not a local key name "
                "(1-64 characters of [A-Za-z0-9_-], optionally prefixed 'local:')"
            ) from None


def build_observers(settings: Settings, keyring: Keyring, telemetry: Telemetry = NULL_TELEMETRY) -> list[Observer]:
    """Audit first, then metrics (and OpenTelemetry): a strict-audit veto reaches them as the refused operation."""
    from kmsguard.audit import build_observer

    observers: list[Observer] = [build_observer(settings, keyring, telemetry)]
    for part in telemetry.parts if isinstance(telemetry, Telemetries) else (telemetry,):
        if isinstance(part, Observer):
            observers.append(part)
    return observers
