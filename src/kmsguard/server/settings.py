"""The ``[server]`` table: where ``kmsguard serve`` listens, its limits and its auth. Validated here.

::

    [server]
    host = "127.0.0.1"          # KMSGUARD_SERVER_HOST
    port = 8080                 # KMSGUARD_SERVER_PORT
    workers = 1                 # KMSGUARD_SERVER_WORKERS: processes, each with its own Guard
    max_request_bytes = 1048576 # a bigger body answers 413 without being read whole
    max_batch_items = 1000      # a bigger batch answers 413
    auth = "api_keys"           # or "none": only when host is a loopback address
    metrics_auth = true         # /metrics needs an admin key (false: open, for a scraper inside the network)
    rate_limit = 1000           # requests per second per API key per worker (0: no limit)
    rate_burst = 2000           # the bucket's size
    shutdown_timeout = 30       # seconds in-flight requests get after SIGTERM
    api_keys = "file"           # "file" ($KMSGUARD_HOME/apikeys.json, mode 0600) or "postgres"
    api_keys_dsn = "postgresql://..."  # for "postgres" (or KMSGUARD_SERVER_API_KEYS_DSN)
    api_keys_schema = "kmsguard"
    ready_interval = 5          # seconds a readiness answer is reused

Every field has a ``KMSGUARD_SERVER_<FIELD>`` variable that overrides the file.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kmsguard.config import Settings
from kmsguard.errors import ConfigurationError

AUTH_MODES = ("api_keys", "none")
KEY_STORES = ("file", "postgres")
_ENV_PREFIX = "KMSGUARD_SERVER_"


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    max_request_bytes: int = 1 << 20
    max_batch_items: int = 1000
    auth: str = "api_keys"
    metrics_auth: bool = True
    rate_limit: float = 1000.0
    rate_burst: int = 2000
    shutdown_timeout: float = 30.0
    api_keys: str = "file"
    api_keys_dsn: str | None = None
    api_keys_schema: str = "kmsguard"
    ready_interval: float = 5.0

    @classmethod
    def of(cls, settings: Settings, **overrides: Any) -> ServerSettings:
        """The section, then ``KMSGUARD_SERVER_*``, then ``overrides`` (command-line options, None = unset)."""
        return cls.from_section(settings.section("server"), settings.env, **overrides)

    @classmethod
    def from_section(cls, section: Mapping[str, Any], env: Mapping[str, str], **overrides: Any) -> ServerSettings:
        fields = cls.__dataclass_fields__
        unknown = set(section) - set(fields)
        if unknown:
            raise ConfigurationError(f"server.{sorted(unknown)[0]}: unknown setting")
        raw: dict[str, Any] = dict(section)
        for name in fields:
            var = _ENV_PREFIX + name.upper()
            if env.get(var):
                raw[name] = _from_env(var, env[var], type(getattr(cls, name, "")) if name != "api_keys_dsn" else str)
        raw.update({k: v for k, v in overrides.items() if v is not None})
        s = cls(
            host=_get(raw, "host", str, cls.host),
            port=_int(raw, "port", cls.port, 0, 65535),
            workers=_int(raw, "workers", cls.workers, 1, 256),
            max_request_bytes=_int(raw, "max_request_bytes", cls.max_request_bytes, 1024, 1 << 30),
            max_batch_items=_int(raw, "max_batch_items", cls.max_batch_items, 1, 100_000),
            auth=_choice(raw, "auth", AUTH_MODES, cls.auth),
            metrics_auth=_get(raw, "metrics_auth", bool, cls.metrics_auth),
            rate_limit=_number(raw, "rate_limit", cls.rate_limit, 0, 1e9),
            rate_burst=_int(raw, "rate_burst", cls.rate_burst, 1, 1 << 30),
            shutdown_timeout=_number(raw, "shutdown_timeout", cls.shutdown_timeout, 1, 3600),
            api_keys=_choice(raw, "api_keys", KEY_STORES, cls.api_keys),
            api_keys_dsn=_get(raw, "api_keys_dsn", str, None),
            api_keys_schema=_get(raw, "api_keys_schema", str, cls.api_keys_schema),
            ready_interval=_number(raw, "ready_interval", cls.ready_interval, 0.1, 3600),
        )
        if s.api_keys == "postgres" and not s.api_keys_dsn:
            raise ConfigurationError("server.api_keys_dsn: the postgres key store needs a dsn")
        if s.auth == "none" and not is_loopback(s.host):
            raise ConfigurationError(
                f'server.auth: "none" is allowed only on a loopback address, not on {s.host!r}'
            )
        return s


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _from_env(var: str, text: str, kind: type) -> Any:
    """A variable's text as the field's type; a bad one names the variable."""
    try:
        if kind is bool:
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return text.lower() in ("true", "1")
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
    except ValueError:
        raise ConfigurationError(f"{var}: must be {'true or false' if kind is bool else 'a number'}") from None
    return text


def _get(raw: Mapping[str, Any], name: str, kind: type, default: Any) -> Any:
    value = raw.get(name, default)
    if value is default:
        return value
    if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind) or value == "":
        what = {str: "a non-empty string", bool: "true or false"}.get(kind, kind.__name__)
        raise ConfigurationError(f"server.{name}: must be {what}")
    return value


def _int(raw: Mapping[str, Any], name: str, default: int, low: int, high: int) -> int:
    value = raw.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigurationError(f"server.{name}: must be a whole number from {low} to {high}")
    return value


def _number(raw: Mapping[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = raw.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigurationError(f"server.{name}: must be a number")
    if not low <= value <= high:
        raise ConfigurationError(f"server.{name}: must be from {low:g} to {high:g}")
    return float(value)


def _choice(raw: Mapping[str, Any], name: str, choices: tuple[str, ...], default: str) -> str:
    value = raw.get(name, default)
    if value not in choices:
        raise ConfigurationError(f"server.{name}: must be one of {', '.join(choices)}, not {value!r}")
    return str(value)
