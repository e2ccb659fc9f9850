"""The ``[aws]`` settings: regions, credentials source, endpoints, retries and timeouts.

Values come from presets per ``environment`` and are each overridable in ``[aws]``::

    [aws]
    regions = ["eu-west-1", "eu-central-1"]   # or KMSGUARD_REGIONS="eu-west-1,eu-central-1"
    profile = "payments"                      # a profile of the shared config files
    role_arn = "arn:aws:iam::123456789012:role/kmsguard"   # assumed with automatic refresh
    max_attempts = 3                          # attempts per call for transient failures, the first included
                                              # (throttling is retried until operation_timeout instead)
    connect_timeout = 5
    read_timeout = 30
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

from kmsguard.config_table import ConfigTable
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


#: development fails fast; production waits longer for a slow region before giving up.
PRESETS: Mapping[str, Preset] = {
    "development": Preset(
        max_attempts=2, connect_timeout=2.0, read_timeout=10.0, max_pool_connections=10, operation_timeout=15.0
    ),
    "staging": Preset(
        max_attempts=3, connect_timeout=3.0, read_timeout=20.0, max_pool_connections=25, operation_timeout=25.0
    ),
    "production": Preset(
        max_attempts=3, connect_timeout=5.0, read_timeout=30.0, max_pool_connections=50, operation_timeout=30.0
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
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
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
        aws = ConfigTable(section, "aws", KNOWN_FIELDS)
        preset = PRESETS.get(environment, PRESETS["development"])
        pool = aws.integer("max_pool_connections", preset.max_pool_connections, minimum=1)
        concurrency = aws.integer("concurrency", 0, minimum=0)
        return cls(
            regions=_regions(aws, env),
            profile=aws.optional_string("profile"),
            role_arn=aws.optional_string(
                "role_arn", pattern=_ROLE_ARN_RE, shape="an IAM role ARN (arn:aws:iam::<account>:role/<name>)"
            ),
            role_session_name=aws.optional_string("role_session_name") or "kmsguard",
            role_duration_seconds=aws.integer("role_duration_seconds", 3600, minimum=900),
            external_id=aws.optional_string("external_id"),
            endpoints=_endpoints(aws),
            default_endpoint=_env_endpoint(env),
            max_attempts=aws.integer("max_attempts", preset.max_attempts, minimum=1),
            connect_timeout=aws.number("connect_timeout", preset.connect_timeout, above=0),
            read_timeout=aws.number("read_timeout", preset.read_timeout, above=0),
            operation_timeout=aws.number("operation_timeout", preset.operation_timeout, minimum=0),
            # botocore opens and throws away connections beyond the pool; size it for the concurrency.
            max_pool_connections=max(pool, concurrency),
            tcp_keepalive=aws.boolean("tcp_keepalive", True),
            alias_cache_ttl=aws.number("alias_cache_ttl", 300.0, minimum=0),
        )


def _regions(aws: ConfigTable, env: Mapping[str, str]) -> tuple[str, ...]:
    if env.get("KMSGUARD_REGIONS"):
        regions = [r.strip() for r in env["KMSGUARD_REGIONS"].split(",") if r.strip()]
        where = "KMSGUARD_REGIONS"
    elif "regions" in aws:
        regions, where = aws.strings("regions"), aws.path("regions")
    else:
        fallback = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
        if not fallback:
            raise aws.error("regions", "no region configured; set [aws] regions, KMSGUARD_REGIONS or AWS_REGION")
        regions, where = [fallback], "AWS_REGION"
    if not regions:
        raise ConfigurationError(f"{where}: must name at least one region")
    for region in regions:
        if not _REGION_RE.fullmatch(region):
            raise ConfigurationError(f"{where}: {region!r} is not a region name")
    if len(set(regions)) != len(regions):
        raise ConfigurationError(f"{where}: a region is listed twice")
    return tuple(regions)


def _endpoints(aws: ConfigTable) -> dict[str, str]:
    """``[aws.endpoints]``: region = http(s) URL."""
    table = aws.table("endpoints", None)
    endpoints = {}
    for region in table.names():
        if not _REGION_RE.fullmatch(region):
            raise table.error(region, "not a region name")
        endpoints[region] = table.string(region, pattern=_URL_RE, shape="an http(s) URL")
    return endpoints


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
