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

Every field has a ``KMSGUARD_SERVER_<FIELD>`` variable that overrides the file, and
``kmsguard serve``'s options override both. Values are checked by
:class:`kmsguard.config_table.ConfigTable`, as every other section's.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kmsguard.config import Settings
from kmsguard.config_table import ConfigTable
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
        ConfigTable(section, "server", fields)  # an unknown setting in the file is an error
        raw: dict[str, Any] = dict(section)
        for name in fields:
            var = _ENV_PREFIX + name.upper()
            if env.get(var):
                raw[name] = _from_env(var, env[var], type(getattr(cls, name)) if name != "api_keys_dsn" else str)
        raw.update({k: v for k, v in overrides.items() if v is not None})
        t = ConfigTable(raw, "server", fields)
        s = cls(
            host=t.string("host", cls.host),
            port=t.integer("port", cls.port, minimum=0, maximum=65535),
            workers=t.integer("workers", cls.workers, minimum=1, maximum=256),
            max_request_bytes=t.integer("max_request_bytes", cls.max_request_bytes, minimum=1024, maximum=1 << 30),
            max_batch_items=t.integer("max_batch_items", cls.max_batch_items, minimum=1, maximum=100_000),
            auth=t.choice("auth", AUTH_MODES, cls.auth),
            metrics_auth=t.boolean("metrics_auth", cls.metrics_auth),
            rate_limit=t.number("rate_limit", cls.rate_limit, minimum=0, maximum=1e9),
            rate_burst=t.integer("rate_burst", cls.rate_burst, minimum=1, maximum=1 << 30),
            shutdown_timeout=t.number("shutdown_timeout", cls.shutdown_timeout, minimum=1, maximum=3600),
            api_keys=t.choice("api_keys", KEY_STORES, cls.api_keys),
            api_keys_dsn=t.optional_string("api_keys_dsn"),
            api_keys_schema=t.string("api_keys_schema", cls.api_keys_schema),
            ready_interval=t.number("ready_interval", cls.ready_interval, minimum=0.1, maximum=3600),
        )
        if s.api_keys == "postgres" and not s.api_keys_dsn:
            raise t.error("api_keys_dsn", "the postgres key store needs a dsn")
        if s.auth == "none" and not is_loopback(s.host):
            raise t.error("auth", f'"none" is allowed only on a loopback address, not on {s.host!r}')
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
