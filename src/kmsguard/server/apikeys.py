"""API keys of the HTTP service: tokens, scopes, and where their hashes are kept.

A token is ``kgk_`` followed by 32 random bytes in base64url (no padding). It is shown
once, when made; only its SHA-256 is stored (a token is 256 random bits, so a fast hash
is as hard to reverse as a slow one). A key has a unique ``name`` (the principal of its
audit records) and scopes ``OP:CLASS``: OP one of :data:`OPERATIONS`, CLASS a
classification or ``*``; ``admin`` covers every operation and ``/metrics``.

Two stores, one interface (:class:`KeyStore`):

* :class:`FileKeyStore`, ``$KMSGUARD_HOME/apikeys.json`` (mode 0600), changed under an
  exclusive ``flock`` and replaced atomically, so a server reading it never sees half a
  file;
* :class:`PostgresKeyStore`, table ``<schema>.api_keys``, shared by every replica.

A server checks its store every ``REFRESH_SECONDS`` (a stat of the file, or a query) and
reloads the keys when they changed, off its event loop. A revoked key is refused by every
worker within ``REVOCATION_SECONDS``: while the store cannot be read, a worker goes on
with the keys it last loaded, and refuses every key once that load is older than the
promise allows (:class:`kmsguard.errors.ApiKeysUnavailable`).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from kmsguard.errors import ConfigurationError, InvalidInput
from kmsguard.policy import CLASSIFICATION_RE

TOKEN_PREFIX = "kgk_"  # noqa: S105 - the public prefix that makes a leaked token recognisable
_TOKEN_RE = re.compile(r"kgk_[A-Za-z0-9_-]{43}")
OPERATIONS = ("encrypt", "decrypt", "rewrap", "inspect", "admin")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
FILE_NAME = "apikeys.json"
#: Seconds between a server's checks of its store for changed keys (revocations).
REFRESH_SECONDS = 1.0
#: The promise: a revoked key is refused by every worker within this many seconds.
REVOCATION_SECONDS = 5.0
#: Seconds between writes of keys' last-used times (kept in memory in between).
LAST_USED_SECONDS = 30.0


@dataclass(frozen=True)
class Scope:
    operation: str
    classification: str

    @classmethod
    def parse(cls, text: str) -> Scope:
        op, sep, cls_name = text.partition(":")
        if not sep or op not in OPERATIONS:
            raise InvalidInput(f"scope {text!r}: must be OP:CLASS with OP one of {', '.join(OPERATIONS)}")
        if cls_name != "*" and not CLASSIFICATION_RE.fullmatch(cls_name):
            raise InvalidInput(f"scope {text!r}: CLASS must be a classification name or *")
        return cls(op, cls_name)

    def covers(self, operation: str, classification: str | None) -> bool:
        """``classification`` None: the operation on any classification (``/metrics``, a request's first check)."""
        if self.operation not in (operation, "admin"):
            return False
        return self.classification == "*" or classification is None or self.classification == classification

    def __str__(self) -> str:
        return f"{self.operation}:{self.classification}"


@dataclass(frozen=True)
class ApiKey:
    name: str
    digest: str  # hex SHA-256 of the token
    scopes: tuple[Scope, ...]
    created: float
    last_used: float | None = None
    revoked: float | None = None

    def allows(self, operation: str, classification: str | None = None) -> bool:
        return any(s.covers(operation, classification) for s in self.scopes)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "scopes": [str(s) for s in self.scopes]}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> ApiKey:
        return cls(
            name=str(doc["name"]),
            digest=str(doc["digest"]),
            scopes=tuple(Scope.parse(s) for s in doc["scopes"]),
            created=float(doc["created"]),
            last_used=None if doc.get("last_used") is None else float(doc["last_used"]),
            revoked=None if doc.get("revoked") is None else float(doc["revoked"]),
        )


def new_token() -> str:
    return TOKEN_PREFIX + base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode("ascii")


def digest_of(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def check_name(name: str) -> str:
    if not _NAME_RE.fullmatch(name):
        raise InvalidInput("an API key name is 1-64 characters of [A-Za-z0-9_.@-], starting with a letter or digit")
    return name


class KeyStore(Protocol):
    """Where API keys live. ``load()`` is every key, revoked ones included; ``version()``
    changes whenever a key is added or revoked."""

    def load(self) -> list[ApiKey]: ...
    def add(self, key: ApiKey) -> None: ...
    def revoke(self, name: str) -> bool: ...
    def touch(self, last_used: dict[str, float]) -> None: ...
    def version(self) -> object: ...


def create_key(store: KeyStore, name: str, scopes: Sequence[str]) -> str:
    """Add key ``name`` with ``scopes``; returns its token (the only time it exists outside the caller)."""
    check_name(name)
    if not scopes:
        raise InvalidInput("an API key needs at least one --allow OP:CLASS")
    parsed = tuple(dict.fromkeys(Scope.parse(s) for s in scopes))
    token = new_token()
    store.add(ApiKey(name, digest_of(token), parsed, time.time()))
    return token


class KeyIndex:
    """A server's view of the store: tokens to live keys, reloaded when the store changes.

    ``lookup`` finds a key by its token's digest, then compares the whole digest with
    ``hmac.compare_digest`` (constant time). Last-used times are kept here and written
    to the store every ``LAST_USED_SECONDS`` by :meth:`flush_last_used`.

    Reading the store is blocking I/O (a PostgreSQL query can wait for its connect
    timeout), so a server calls :meth:`maybe_reload` every ``refresh`` seconds from a
    thread of its own, and a request only asks :meth:`age` how current the keys are.
    """

    def __init__(self, store: KeyStore, refresh: float = REFRESH_SECONDS) -> None:
        self.store = store
        self.refresh = refresh
        self._lock = threading.Lock()
        self._by_digest: dict[str, ApiKey] = {}
        self._version: object = None
        self._confirmed = -1e9
        self._used: dict[str, float] = {}
        self.reload()

    def reload(self) -> None:
        """Load every live key. A store that cannot be read raises, and the index stays as it was."""
        started = time.monotonic()
        version = self.store.version()
        keys = {k.digest: k for k in self.store.load() if k.revoked is None}
        with self._lock:
            self._by_digest, self._version, self._confirmed = keys, version, started

    def maybe_reload(self) -> None:
        """Reload if the store changed. Either way the keys are then known current as of the
        moment this began; a store that cannot be read raises, and the index stays as it was."""
        started = time.monotonic()
        if self.store.version() != self._version:
            self.reload()
            return
        with self._lock:
            self._confirmed = started

    def age(self) -> float:
        """Seconds since the store last matched this index: a key revoked earlier is refused."""
        return time.monotonic() - self._confirmed

    def lookup(self, token: str) -> ApiKey | None:
        if not _TOKEN_RE.fullmatch(token):
            return None
        digest = digest_of(token)
        key = self._by_digest.get(digest)
        if key is None or not hmac.compare_digest(key.digest.encode("ascii"), digest.encode("ascii")):
            return None
        with self._lock:
            self._used[key.name] = time.time()
        return key

    def flush_last_used(self) -> None:
        with self._lock:
            used, self._used = self._used, {}
        if used:
            self.store.touch(used)


# ---------------------------------------------------------------------- file store


class FileKeyStore:
    """``apikeys.json`` in ``$KMSGUARD_HOME``: ``{"version": 1, "keys": [...]}``, mode 0600."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock_path = path.with_name(path.name + ".lock")

    def load(self) -> list[ApiKey]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise ConfigurationError(f"{self.path}: cannot be read ({exc.strerror})") from None
        try:
            doc = json.loads(text)
            return [ApiKey.from_json(k) for k in doc["keys"]]
        except (ValueError, KeyError, TypeError, InvalidInput):
            raise ConfigurationError(f"{self.path}: not a kmsguard API key file") from None

    def version(self) -> object:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def add(self, key: ApiKey) -> None:
        with self._changing() as keys:
            if any(k.name == key.name for k in keys):
                raise InvalidInput(f"an API key named {key.name!r} exists (revoke it first, or pick another name)")
            keys.append(key)

    def revoke(self, name: str) -> bool:
        with self._changing() as keys:
            for i, k in enumerate(keys):
                if k.name == name and k.revoked is None:
                    keys[i] = replace(k, revoked=time.time())
                    return True
        return False

    def touch(self, last_used: dict[str, float]) -> None:
        with self._changing() as keys:
            for i, k in enumerate(keys):
                when = last_used.get(k.name)
                if when is not None and k.revoked is None:
                    keys[i] = replace(k, last_used=max(when, k.last_used or 0.0))

    @contextlib.contextmanager
    def _changing(self) -> Iterator[list[ApiKey]]:
        """The keys under an exclusive lock; written back (atomically, 0600) when the block ends."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            keys = self.load()
            yield keys
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(out, "w", encoding="utf-8") as fh:
                json.dump({"version": 1, "keys": [k.to_json() for k in keys]}, fh, indent=1)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        finally:
            os.close(fd)


# ---------------------------------------------------------------------- PostgreSQL store

_SCHEMA_RE = re.compile(r"[a-z_][a-z0-9_]{0,62}")


@dataclass
class PostgresKeyStore:
    """Table ``<schema>.api_keys`` (made on first use), shared by every replica of the service."""

    dsn: str
    schema: str = "kmsguard"
    _ready: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        if not _SCHEMA_RE.fullmatch(self.schema):
            raise ConfigurationError("server.api_keys_schema: must be a lower-case SQL identifier")

    def _connect(self) -> Any:
        try:
            import psycopg
        except ImportError:
            raise ConfigurationError('server.api_keys: "postgres" needs psycopg; install kmsguard[postgres]') from None
        try:
            conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=5)
        except psycopg.Error as exc:
            raise ConfigurationError(f"server.api_keys_dsn: cannot connect ({type(exc).__name__})") from None
        if not self._ready:
            conn.execute(f"CREATE SCHEMA IF NOT EXISTS {self.schema}")
            conn.execute(
                f"CREATE TABLE IF NOT EXISTS {self.schema}.api_keys ("
                "name text PRIMARY KEY, digest text NOT NULL UNIQUE, scopes text NOT NULL, "
                "created double precision NOT NULL, last_used double precision, revoked double precision, "
                "changed bigint NOT NULL DEFAULT 0)"
            )
            self._ready = True
        return conn

    def load(self) -> list[ApiKey]:
        with self._connect() as conn:
            rows = conn.execute(
                f"SELECT name, digest, scopes, created, last_used, revoked FROM {self.schema}.api_keys ORDER BY name"  # noqa: S608 - schema checked by _SCHEMA_RE
            ).fetchall()
        return [
            ApiKey(r[0], r[1], tuple(Scope.parse(s) for s in r[2].split()), r[3], r[4], r[5]) for r in rows
        ]

    def version(self) -> object:
        with self._connect() as conn:
            row = conn.execute(
                f"SELECT count(*), coalesce(max(changed), 0), count(revoked) FROM {self.schema}.api_keys"  # noqa: S608 - schema checked by _SCHEMA_RE
            ).fetchone()
        return tuple(row) if row else None

    def add(self, key: ApiKey) -> None:
        import psycopg

        with self._connect() as conn:
            try:
                conn.execute(
                    f"INSERT INTO {self.schema}.api_keys (name, digest, scopes, created, changed) "  # noqa: S608 - schema checked by _SCHEMA_RE
                    "VALUES (%s, %s, %s, %s, %s)",
                    (key.name, key.digest, " ".join(str(s) for s in key.scopes), key.created, time.time_ns()),
                )
            except psycopg.errors.UniqueViolation:
                raise InvalidInput(f"an API key named {key.name!r} exists") from None

    def revoke(self, name: str) -> bool:
        with self._connect() as conn:
            cur = conn.execute(
                f"UPDATE {self.schema}.api_keys SET revoked = %s, changed = %s WHERE name = %s AND revoked IS NULL",  # noqa: S608 - schema checked by _SCHEMA_RE
                (time.time(), time.time_ns(), name),
            )
            return bool(cur.rowcount)

    def touch(self, last_used: dict[str, float]) -> None:
        with self._connect() as conn:
            for name, when in last_used.items():
                conn.execute(
                    f"UPDATE {self.schema}.api_keys SET last_used = greatest(coalesce(last_used, 0), %s) "  # noqa: S608 - schema checked by _SCHEMA_RE
                    "WHERE name = %s",
                    (when, name),
                )


def open_store(kind: str, home: Path, dsn: str | None, schema: str) -> KeyStore:
    if kind == "postgres":
        assert dsn is not None
        return PostgresKeyStore(dsn, schema)
    return FileKeyStore(home / FILE_NAME)
