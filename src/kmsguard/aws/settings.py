"""The ``[aws]`` settings: regions, credentials source, endpoints, retries and timeouts.

Values come from presets per ``environment`` and are each overridable in ``[aws]``::

    [aws]
    regions = ["eu-west-1", "eu-central-1"]   # or KMSGUARD_REGIONS="eu-west-1,eu-central-1"
    profile = "payments"                      # a profile of the shared config files
    role_arn = "arn:aws:iam::123456789012:role/kmsguard"   # assumed with automatic refresh
    max_attempts = 3                          # attempts per call for transient failures, the first included
                                              # (throttling is retried until operation_timeout instead)
    connect_timeout = 1                       # one HTTP attempt's connect ...
    read_timeout = 3                          # ... and read: KMS answers in milliseconds
    operation_timeout = 30                    # kmsguard's own deadline per keyring operation
    max_pool_connections = 50
    [aws.endpoints]
    eu-west-1 = "https://vpce-0abc.kms.eu-west-1.vpce.amazonaws.com"

No secret ever lives here: credentials come from boto3's own chain.

There is no setting for the retry back-off: throttling is retried until
``operation_timeout`` (the one knob a caller needs: how long it can wait) with the
fixed full-jitter schedule of :mod:`kmsguard.backoff`; see :mod:`kmsguard.aws.retry`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kmsguard.errors import ConfigurationError

_REGION_RE = re.compile(r"[a-z]{2}(-[a-z0-9]+)+-\d+")
_ROLE_ARN_RE = re.compile(r"arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]+")
_URL_RE = re.compile(r"https?://[^\s/]+(/\S*)?")


@dataclass(frozen=True)
class Preset:
    """Retry and timeout values for one environment (see docs/aws.md)."""

    max_attempts: int
    connect_timeout: float
    read_timeout: float
    max_pool_connections: int
    operation_timeout: float


#: Timeouts sized for KMS, whose calls take milliseconds: a connection not made within
#: 1 s (a lost SYN is resent after 1 s) or a read not answered within a few seconds is
#: stuck, and a new attempt -- a new connection, or another region -- beats waiting on
#: it. ``read_timeout`` bounds one HTTP attempt, ``operation_timeout`` the whole
#: operation; with several regions each region's try gets a share of the latter (see
#: kmsguard.keyrings.multi_region). development fails fast; production allows a slower
#: read and has the longest deadline for throttling to be waited out.
PRESETS: Mapping[str, Preset] = {
    "development": Preset(
        max_attempts=2, connect_timeout=1.0, read_timeout=2.0, max_pool_connections=10, operation_timeout=15.0
    ),
    "staging": Preset(
        max_attempts=3, connect_timeout=1.0, read_timeout=2.0, max_pool_connections=25, operation_timeout=25.0
    ),
    "production": Preset(
        max_attempts=3, connect_timeout=1.0, read_timeout=3.0, max_pool_connections=50, operation_timeout=30.0
    ),
}

#: Every setting ``[aws]`` accepts; components that extend the section add theirs here.
KNOWN_FIELDS: set[str] = {
    "regions",
    "profile",
    "role_arn",
    "role_session_name",
    "role_duration_seconds",
    "external_id",
    "endpoints",
    "max_attempts",
    "connect_timeout",
    "read_timeout",
    "operation_timeout",
    "max_pool_connections",
    "concurrency",
    "tcp_keepalive",
    "alias_cache_ttl",
    # the multi-region keyring's (kmsguard.keyrings.multi_region.MultiRegionOptions)
    "wrap_in_all_regions",
    "breaker_failures",
    "breaker_cooldown",
    "keys",
    "hedge",
    "hedge_delay_min",
    "hedge_delay_max",
}


@dataclass(frozen=True)
class AwsSettings:
    """Validated ``[aws]`` settings. ``endpoint_for(region)`` picks the URL for a region."""

    regions: tuple[str, ...]
    profile: str | None = None
    role_arn: str | None = None
    role_session_name: str = "kmsguard"
    role_duration_seconds: int = 3600
    external_id: str | None = None
    endpoints: Mapping[str, str] = field(default_factory=dict)
    default_endpoint: str | None = None
    max_attempts: int = 3
    connect_timeout: float = 1.0
    read_timeout: float = 3.0
    operation_timeout: float = 30.0
    max_pool_connections: int = 50
    tcp_keepalive: bool = True
    alias_cache_ttl: float = 300.0

    @property
    def region(self) -> str:
        """The preferred (first) region."""
        return self.regions[0]

    def endpoint_for(self, region: str) -> str | None:
        """``[aws.endpoints]`` for the region, else ``AWS_ENDPOINT_URL_KMS``/``AWS_ENDPOINT_URL``, else AWS's own."""
        return self.endpoints.get(region) or self.default_endpoint

    @classmethod
    def from_section(cls, section: Mapping[str, Any], env: Mapping[str, str], environment: str) -> AwsSettings:
        """Validate ``[aws]`` against the preset for ``environment``; ConfigurationError names the field."""
        unknown = set(section) - KNOWN_FIELDS
        if unknown:
            raise ConfigurationError(f"aws: unknown setting {sorted(unknown)[0]!r}")
        preset = PRESETS.get(environment, PRESETS["development"])
        pool = _int(section, "max_pool_connections", preset.max_pool_connections)
        concurrency = _int(section, "concurrency", 0, minimum=0)
        return cls(
            regions=_regions(section, env),
            profile=_opt_str(section, "profile"),
            role_arn=_role_arn(section),
            role_session_name=_opt_str(section, "role_session_name") or "kmsguard",
            role_duration_seconds=_int(section, "role_duration_seconds", 3600, minimum=900),
            external_id=_opt_str(section, "external_id"),
            endpoints=_endpoints(section),
            default_endpoint=_env_endpoint(env),
            max_attempts=_int(section, "max_attempts", preset.max_attempts),
            connect_timeout=_float(section, "connect_timeout", preset.connect_timeout),
            read_timeout=_float(section, "read_timeout", preset.read_timeout),
            operation_timeout=_float(section, "operation_timeout", preset.operation_timeout, allow_zero=True),
            # botocore opens and throws away connections beyond the pool; size it for the concurrency.
            max_pool_connections=max(pool, concurrency),
            tcp_keepalive=_bool(section, "tcp_keepalive", True),
            alias_cache_ttl=_float(section, "alias_cache_ttl", 300.0, allow_zero=True),
        )


def _regions(section: Mapping[str, Any], env: Mapping[str, str]) -> tuple[str, ...]:
    if env.get("KMSGUARD_REGIONS"):
        regions = [r.strip() for r in env["KMSGUARD_REGIONS"].split(",") if r.strip()]
        where = "KMSGUARD_REGIONS"
    elif "regions" in section:
        value = section["regions"]
        if not isinstance(value, list) or not all(isinstance(r, str) for r in value):
            raise ConfigurationError("aws.regions: must be a list of region names")
        regions, where = list(value), "aws.regions"
    else:
        fallback = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
        if not fallback:
            raise ConfigurationError(
                "aws.regions: no region configured; set [aws] regions, KMSGUARD_REGIONS or AWS_REGION"
            )
        regions, where = [fallback], "AWS_REGION"
    if not regions:
        raise ConfigurationError(f"{where}: must name at least one region")
    for region in regions:
        if not _REGION_RE.fullmatch(region):
            raise ConfigurationError(f"{where}: {region!r} is not a region name")
    if len(set(regions)) != len(regions):
        raise ConfigurationError(f"{where}: a region is listed twice")
    return tuple(regions)


def _role_arn(section: Mapping[str, Any]) -> str | None:
    arn = _opt_str(section, "role_arn")
    if arn is not None and not _ROLE_ARN_RE.fullmatch(arn):
        raise ConfigurationError("aws.role_arn: must be an IAM role ARN (arn:aws:iam::<account>:role/<name>)")
    return arn


def _endpoints(section: Mapping[str, Any]) -> dict[str, str]:
    table = section.get("endpoints", {})
    if not isinstance(table, dict):
        raise ConfigurationError("aws.endpoints: must be a table of region = URL")
    for region, url in table.items():
        if not _REGION_RE.fullmatch(region):
            raise ConfigurationError(f"aws.endpoints: {region!r} is not a region name")
        if not isinstance(url, str) or not _URL_RE.fullmatch(url):
            raise ConfigurationError(f"aws.endpoints.{region}: must be an http(s) URL")
    return dict(table)


def _env_endpoint(env: Mapping[str, str]) -> str | None:
    """The SDKs' standard variables; read here so that an explicit ``env`` mapping is honoured too."""
    if (env.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS") or "").lower() == "true":
        return None
    for var in ("AWS_ENDPOINT_URL_KMS", "AWS_ENDPOINT_URL"):
        url = env.get(var)
        if url:
            if not _URL_RE.fullmatch(url):
                raise ConfigurationError(f"{var}: must be an http(s) URL")
            return url
    return None


def _opt_str(section: Mapping[str, Any], name: str) -> str | None:
    value = section.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigurationError(f"aws.{name}: must be a non-empty string")
    return value


def _int(section: Mapping[str, Any], name: str, default: int, minimum: int = 1) -> int:
    value = section.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigurationError(f"aws.{name}: must be a whole number of at least {minimum}")
    return value


def _float(section: Mapping[str, Any], name: str, default: float, allow_zero: bool = False) -> float:
    value = section.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigurationError(f"aws.{name}: must be a number")
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigurationError(f"aws.{name}: must be {'zero or more' if allow_zero else 'more than zero'}")
    return float(value)


def _bool(section: Mapping[str, Any], name: str, default: bool) -> bool:
    value = section.get(name, default)
    if not isinstance(value, bool):
        raise ConfigurationError(f"aws.{name}: must be true or false")
    return value
