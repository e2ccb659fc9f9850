"""Settings: ``$KMSGUARD_HOME/kmsguard.toml`` (or ``$KMSGUARD_CONFIG``), then ``KMSGUARD_*`` overrides.

Every bad file or value raises :class:`ConfigurationError` naming the field (for example
``classifications.payment.cache.max_age``), never a traceback: a misconfigured service
should say what to fix in one line. Sections owned by other components (``[aws]``,
``[audit]``, ``[metrics]``, ``[server]``) are kept as raw tables here and validated by
those components, so this module does not grow with each of them.
"""

from __future__ import annotations

import getpass
import math
import os
import re
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kmsguard.errors import ConfigurationError, KmsGuardError
from kmsguard.keyrings.caching import DEFAULT_MAX_ENTRIES
from kmsguard.policy import (
    CLASSIFICATION_RE,
    DEFAULT_CACHE_LIMITS,
    DEFAULT_CLASSIFICATIONS,
    CacheLimits,
    ClassPolicy,
    Policy,
)

CONFIG_FILE_NAME = "kmsguard.toml"
BACKENDS = ("local", "aws")
ENVIRONMENTS = ("development", "staging", "production")
COMPONENT_SECTIONS = ("aws", "audit", "metrics", "server")
_TOP_LEVEL = {"backend", "app", "environment", "principal", "classifications", "cache", *COMPONENT_SECTIONS}
_CLASS_FIELDS = {"key", "required_context", "kms_context_keys", "strict_audit", "regions", "cache"}
_CACHE_FIELDS = {"reuse", "max_age", "max_messages", "max_bytes", "decrypt_ttl"}
_APP_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True)
class Settings:
    """Everything a Guard and its front ends are built from."""

    home: Path
    backend: str
    app: str
    environment: str
    principal: str
    policy: Policy
    config_path: Path | None = None
    sections: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)
    #: ``[cache] max_entries``: data keys one process caches (encrypt and decrypt entries together).
    cache_max_entries: int = DEFAULT_MAX_ENTRIES

    def section(self, name: str) -> Mapping[str, Any]:
        """A component's raw table (``aws``, ``audit``...), empty when absent."""
        return self.sections.get(name, {})

    @property
    def passphrase(self) -> str | None:
        return self.env.get("KMSGUARD_PASSPHRASE") or None


def default_home(env: Mapping[str, str]) -> Path:
    return Path(env.get("KMSGUARD_HOME") or Path.home() / ".kmsguard").expanduser()


def default_key(backend: str, app: str, environment: str, classification: str) -> str:
    """``local:<class>`` for the local keyring, ``alias/<app>-<class>-<environment>`` for AWS."""
    if backend == "local":
        return f"local:{classification}"
    return f"alias/{app}-{classification}-{environment}"


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Read the config file and apply the environment on top. Raises ConfigurationError."""
    env = dict(os.environ if env is None else env)
    home = default_home(env)
    explicit = env.get("KMSGUARD_CONFIG")
    path = Path(explicit).expanduser() if explicit else home / CONFIG_FILE_NAME
    doc = _read_toml(path, required=bool(explicit))

    unknown = set(doc) - _TOP_LEVEL
    if unknown:
        raise ConfigurationError(f"{path}: unknown setting {sorted(unknown)[0]!r}")

    backend = env.get("KMSGUARD_BACKEND") or _str(doc, "backend", "local")
    if backend not in BACKENDS:
        raise ConfigurationError(f"backend: must be one of {', '.join(BACKENDS)}, not {backend!r}")
    app = env.get("KMSGUARD_APP") or _str(doc, "app", "kmsguard")
    if not _APP_RE.fullmatch(app):
        raise ConfigurationError("app: must be 1-64 characters of [A-Za-z0-9_-]")
    environment = env.get("KMSGUARD_ENVIRONMENT") or _str(doc, "environment", "development")
    if environment not in ENVIRONMENTS:
        raise ConfigurationError(f"environment: must be one of {', '.join(ENVIRONMENTS)}, not {environment!r}")
    principal = env.get("KMSGUARD_PRINCIPAL") or _str(doc, "principal", "") or _os_principal()

    policy = _policy(doc.get("classifications", {}), backend, app, environment, env)
    cache_max_entries = _cache_max_entries(doc.get("cache", {}), env)
    sections = {}
    for name in COMPONENT_SECTIONS:
        table = doc.get(name, {})
        if not isinstance(table, dict):
            raise ConfigurationError(f"{name}: must be a table")
        sections[name] = table
    return Settings(
        home=home,
        backend=backend,
        app=app,
        environment=environment,
        principal=principal,
        policy=policy,
        config_path=path if path.exists() else None,
        sections=sections,
        env=env,
        cache_max_entries=cache_max_entries,
    )


def _policy(table: Any, backend: str, app: str, environment: str, env: Mapping[str, str]) -> Policy:
    if not isinstance(table, dict):
        raise ConfigurationError("classifications: must be a table of tables")
    names = list(DEFAULT_CLASSIFICATIONS) + [n for n in table if n not in DEFAULT_CLASSIFICATIONS]
    classes = []
    for name in names:
        where = f"classifications.{name}"
        if not CLASSIFICATION_RE.fullmatch(name):
            raise ConfigurationError(f"{where}: a name must be 1-32 characters of [a-z0-9_-]")
        spec = table.get(name, {})
        if not isinstance(spec, dict):
            raise ConfigurationError(f"{where}: must be a table")
        unknown = set(spec) - _CLASS_FIELDS
        if unknown:
            raise ConfigurationError(f"{where}: unknown setting {sorted(unknown)[0]!r}")
        env_key = env.get(f"KMSGUARD_KEY_{name.upper().replace('-', '_')}")
        key = env_key or _str(spec, "key", default_key(backend, app, environment, name), where)
        required = _str_list(spec, "required_context", where)
        kms_keys = _str_list(spec, "kms_context_keys", where) if "kms_context_keys" in spec else None
        try:
            classes.append(
                ClassPolicy(
                    name=name,
                    key=key,
                    required_context=frozenset(
                        required if "required_context" in spec else (["purpose"] if name == "payment" else [])
                    ),
                    kms_context_keys=frozenset(kms_keys) if kms_keys is not None else None,
                    cache=_cache(spec.get("cache", {}), DEFAULT_CACHE_LIMITS.get(name), where),
                    strict_audit=_bool(spec, "strict_audit", name == "payment", where),
                    regions=tuple(_str_list(spec, "regions", where)),
                )
            )
        except KmsGuardError as exc:
            if isinstance(exc, ConfigurationError):
                raise
            raise ConfigurationError(f"{where}: {exc.message}") from None
    known = {c.name.upper().replace("-", "_") for c in classes}
    for var in env:
        if var.startswith("KMSGUARD_KEY_") and var.removeprefix("KMSGUARD_KEY_") not in known:
            raise ConfigurationError(f"{var}: no classification of that name is configured")
    return Policy(classes)


def _cache(spec: Any, default: CacheLimits | None, where: str) -> CacheLimits:
    where = f"{where}.cache"
    if not isinstance(spec, dict):
        raise ConfigurationError(f"{where}: must be a table")
    unknown = set(spec) - _CACHE_FIELDS
    if unknown:
        raise ConfigurationError(f"{where}: unknown setting {sorted(unknown)[0]!r}")
    base = default or CacheLimits()
    try:
        return CacheLimits(
            reuse=_bool(spec, "reuse", base.reuse, where),
            max_age=_number(spec, "max_age", base.max_age, where),
            max_messages=int(_number(spec, "max_messages", base.max_messages, where, integer=True)),
            max_bytes=int(_number(spec, "max_bytes", base.max_bytes, where, integer=True)),
            decrypt_ttl=_number(spec, "decrypt_ttl", base.decrypt_ttl, where),
        )
    except KmsGuardError as exc:
        if isinstance(exc, ConfigurationError):
            raise
        raise ConfigurationError(f"{where}: {exc.message}") from None


def _cache_max_entries(table: Any, env: Mapping[str, str]) -> int:
    """``[cache] max_entries``, or ``KMSGUARD_CACHE_MAX_ENTRIES``: a whole number of at least 1."""
    if not isinstance(table, dict):
        raise ConfigurationError("cache: must be a table")
    unknown = set(table) - {"max_entries"}
    if unknown:
        raise ConfigurationError(f"cache: unknown setting {sorted(unknown)[0]!r}")
    raw = env.get("KMSGUARD_CACHE_MAX_ENTRIES")
    if raw:
        where, value = "KMSGUARD_CACHE_MAX_ENTRIES", int(raw) if raw.strip().isdigit() else 0
    else:
        where, value = (
            "cache.max_entries",
            int(_number(table, "max_entries", DEFAULT_MAX_ENTRIES, "cache", integer=True)),
        )
    if value < 1:
        raise ConfigurationError(f"{where}: must be a whole number of at least 1")
    return value


# ---------------------------------------------------------------------- typed getters


def _read_toml(path: Path, required: bool) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        if required:
            raise ConfigurationError(f"KMSGUARD_CONFIG: no file at {path}") from None
        return {}
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"{path}: not valid TOML ({exc})") from None
    except OSError as exc:
        raise ConfigurationError(f"{path}: cannot be read ({exc.strerror})") from None


def _where(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _str(table: Mapping[str, Any], name: str, default: str, where: str = "") -> str:
    value = table.get(name, default)
    if not isinstance(value, str) or (not value and default):
        raise ConfigurationError(f"{_where(where, name)}: must be a non-empty string")
    return value


def _bool(table: Mapping[str, Any], name: str, default: bool, where: str) -> bool:
    value = table.get(name, default)
    if not isinstance(value, bool):
        raise ConfigurationError(f"{_where(where, name)}: must be true or false")
    return value


def _number(table: Mapping[str, Any], name: str, default: float, where: str, integer: bool = False) -> float:
    value = table.get(name, default)
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or (integer and not isinstance(value, int))
        or not math.isfinite(value)
    ):
        raise ConfigurationError(f"{_where(where, name)}: must be {'a whole number' if integer else 'a finite number'}")
    return value


def _str_list(table: Mapping[str, Any], name: str, where: str) -> list[str]:
    value = table.get(name, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigurationError(f"{_where(where, name)}: must be a list of non-empty strings")
    return value


def _os_principal() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid{os.getuid()}"
    return f"{user}@{socket.gethostname()}"
