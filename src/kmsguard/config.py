"""Settings: ``$KMSGUARD_HOME/kmsguard.toml`` (or ``$KMSGUARD_CONFIG``), then ``KMSGUARD_*`` overrides.

Every bad file or value raises :class:`ConfigurationError` naming the field (for example
``classifications.payment.cache.max_age``), never a traceback: a misconfigured service
should say what to fix in one line. Sections owned by other components (``[aws]``,
``[audit]``, ``[metrics]``, ``[server]``, ``[selftest]``) are kept as raw tables here and validated by
those components, so this module does not grow with each of them.
"""

from __future__ import annotations

import getpass
import os
import re
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from kmsguard.config_table import ConfigTable
from kmsguard.errors import ConfigurationError, InvalidInput
from kmsguard.keyrings.caching import DEFAULT_MAX_ENTRIES
from kmsguard.policy import CLASSIFICATION_RE, DEFAULT_CLASSIFICATIONS, CacheLimits, Policy, default_class

CONFIG_FILE_NAME = "kmsguard.toml"
BACKENDS = ("local", "aws")
ENVIRONMENTS = ("development", "staging", "production")
COMPONENT_SECTIONS = ("aws", "audit", "metrics", "server", "selftest", "stream")
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
    doc = ConfigTable(_read_toml(path, required=bool(explicit)), "", _TOP_LEVEL, env)

    backend = doc.choice("backend", BACKENDS, "local", var="KMSGUARD_BACKEND")
    app = doc.string("app", "kmsguard", var="KMSGUARD_APP", pattern=_APP_RE, shape="1-64 characters of [A-Za-z0-9_-]")
    environment = doc.choice("environment", ENVIRONMENTS, "development", var="KMSGUARD_ENVIRONMENT")
    principal = doc.string("principal", "", var="KMSGUARD_PRINCIPAL") or _os_principal()

    policy = _policy(doc.table("classifications", None), backend, app, environment, env)
    return Settings(
        home=home,
        backend=backend,
        app=app,
        environment=environment,
        principal=principal,
        policy=policy,
        config_path=path if path.exists() else None,
        sections={name: doc.raw_table(name) for name in COMPONENT_SECTIONS},
        env=env,
        cache_max_entries=_cache_max_entries(doc),
    )


def _policy(table: ConfigTable, backend: str, app: str, environment: str, env: Mapping[str, str]) -> Policy:
    names = list(DEFAULT_CLASSIFICATIONS) + [n for n in table.names() if n not in DEFAULT_CLASSIFICATIONS]
    classes = []
    for name in names:
        if not CLASSIFICATION_RE.fullmatch(name):
            raise table.error(name, "a name must be 1-32 characters of [a-z0-9_-]")
        spec = table.table(name, _CLASS_FIELDS)
        var = f"KMSGUARD_KEY_{name.upper().replace('-', '_')}"
        base = default_class(name, spec.string("key", default_key(backend, app, environment, name), var=var))
        required = spec.strings("required_context") if "required_context" in spec else base.required_context
        kms_keys = spec.strings("kms_context_keys") if "kms_context_keys" in spec else None
        classes.append(
            replace(
                base,
                required_context=frozenset(required),
                kms_context_keys=None if kms_keys is None else frozenset(kms_keys),
                cache=_cache(spec.table("cache", _CACHE_FIELDS), base.cache),
                strict_audit=spec.boolean("strict_audit", base.strict_audit),
                regions=tuple(spec.strings("regions")),
            )
        )
    known = {c.name.upper().replace("-", "_") for c in classes}
    for var in env:
        if var.startswith("KMSGUARD_KEY_") and var.removeprefix("KMSGUARD_KEY_") not in known:
            raise ConfigurationError(f"{var}: no classification of that name is configured")
    return Policy(classes)


def _cache(spec: ConfigTable, base: CacheLimits) -> CacheLimits:
    try:
        return CacheLimits(
            reuse=spec.boolean("reuse", base.reuse),
            max_age=spec.number("max_age", base.max_age),
            max_messages=spec.integer("max_messages", base.max_messages),
            max_bytes=spec.integer("max_bytes", base.max_bytes),
            decrypt_ttl=spec.number("decrypt_ttl", base.decrypt_ttl),
        )
    except InvalidInput as exc:
        raise ConfigurationError(f"{spec.where}: {exc.message}") from None


def _cache_max_entries(doc: ConfigTable) -> int:
    """``[cache] max_entries``, or ``KMSGUARD_CACHE_MAX_ENTRIES`` when set: a whole number of at least 1."""
    table = doc.table("cache", {"max_entries"})
    var = doc.env.get("KMSGUARD_CACHE_MAX_ENTRIES")
    if var:
        if not var.isdigit() or int(var) < 1:
            raise ConfigurationError("KMSGUARD_CACHE_MAX_ENTRIES: must be a whole number of at least 1")
        return int(var)
    return table.integer("max_entries", DEFAULT_MAX_ENTRIES, minimum=1)


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


def _os_principal() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid{os.getuid()}"
    return f"{user}@{socket.gethostname()}"
