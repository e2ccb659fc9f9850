"""LocalKeyring: versioned AES-256 master keys in a key file, for laptops, tests and CI.

The key file (``$KMSGUARD_HOME/keyring.json``, mode 0600) holds, per key name, numbered
versions of 32-byte master keys with a state (enabled/disabled) and a primary version::

    {"format": "kmsguard-local-keyring", "version": 1,
     "kdf": null,                       # or {"name": "scrypt", "salt", "n", "r", "p"}
     "keys": {...}}                     # or "sealed": base64(nonce || AES-GCM(keys JSON))

With a passphrase (``KMSGUARD_PASSPHRASE``) the key material is sealed under a key
derived by scrypt, so a copied file alone is useless.

A wrapped data key is ``nonce(12) || AES-256-GCM(master, nonce, DEK, aad)`` (60 bytes),
where ``aad`` binds the key reference and the request's bound context, exactly as KMS
binds EncryptionContext: unwrapping under another classification or context fails.
Rotation adds a version and makes it primary; old versions keep unwrapping until they
are disabled, after which they fail with KEY_DISABLED.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import re
import stat
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from kmsguard.datakey import DEK_SIZE, DataKey, WrappedKey
from kmsguard.errors import InvalidCiphertext, InvalidInput, KeyDisabled, KeyNotFound, KeyringError
from kmsguard.keyrings.base import KeyRequest

PROVIDER = "local"
KEY_FILE_NAME = "keyring.json"
FILE_FORMAT = "kmsguard-local-keyring"
_WRAP_AAD = b"kmsguard local wrap v1\x00"
_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_REF_RE = re.compile(r"local:([A-Za-z0-9_-]{1,64}):v([1-9][0-9]{0,8})")
_SCRYPT = {"n": 2**15, "r": 8, "p": 1}
#: Where other components' secrets live in the file; not a valid key name, so never a key.
_SECRETS = "@secrets"


@dataclass(frozen=True)
class KeyVersionInfo:
    """What ``kmsguard keys list`` shows about one version; holds no key material."""

    name: str
    version: int
    state: str
    primary: bool
    created: str

    @property
    def key_ref(self) -> str:
        return f"local:{self.name}:v{self.version}"


def key_name_of(key_id: str) -> str:
    """``local:general`` or ``general`` -> ``general`` (policy keys may use either)."""
    name = key_id.removeprefix("local:")
    if not _NAME_RE.fullmatch(name):
        raise InvalidInput("a local key name must be 1-64 characters of [A-Za-z0-9_-]")
    return name


class LocalKeyring:
    """The embedded keyring. Thread-safe; several processes may share one key file."""

    provider = PROVIDER

    def __init__(self, path: Path, passphrase: str | None = None) -> None:
        self.path = Path(path)
        self._passphrase = passphrase
        self._lock = threading.RLock()
        self._keys: dict[str, dict[str, Any]] = {}
        self._ciphers: dict[tuple[str, int], AESGCM] = {}
        self._kdf: dict[str, Any] | None = None
        self._load()

    # ------------------------------------------------------------------ creation

    @classmethod
    def create(cls, path: Path, names: Sequence[str], passphrase: str | None = None) -> LocalKeyring:
        """Write a new key file with one key per name. Refuses to overwrite one."""
        path = Path(path)
        if path.exists():
            raise KeyringError(f"a key file already exists at {path}; refusing to overwrite it")
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise KeyringError(f"cannot create the directory of {path}: {exc.strerror}") from None
        kdf = None
        if passphrase:
            kdf = {"name": "scrypt", "salt": _b64(os.urandom(16)), **_SCRYPT}
        keys = {key_name_of(n): _new_key_entry() for n in names}
        _write_file(path, _serialize(keys, kdf, passphrase), exclusive=True)
        return cls(path, passphrase)

    # ------------------------------------------------------------------ Keyring protocol

    def generate(self, request: KeyRequest) -> DataKey:
        self._refresh()
        dek = os.urandom(DEK_SIZE)
        return DataKey(dek, (self._wrap(dek, request),))

    def wrap(self, data_key: DataKey, request: KeyRequest) -> DataKey:
        self._refresh()
        return data_key.with_wrapped((*data_key.wrapped, self._wrap(data_key.plaintext, request)))

    def unwrap(self, wrapped: Sequence[WrappedKey], request: KeyRequest) -> DataKey:
        self._refresh()
        dek = self._unwrap_any(wrapped, request)
        return DataKey(dek, tuple(wrapped))

    def rewrap(self, wrapped: Sequence[WrappedKey], request: KeyRequest) -> tuple[WrappedKey, ...]:
        self._refresh()
        dek = self._unwrap_any(wrapped, request)
        return (self._wrap(dek, request),)

    # ------------------------------------------------------------------ key management

    def versions(self) -> list[KeyVersionInfo]:
        self._refresh()
        with self._lock:
            out = []
            for name, entry in sorted(self._keys.items()):
                if name == _SECRETS:
                    continue
                for v, info in sorted(entry["versions"].items(), key=lambda kv: int(kv[0])):
                    out.append(KeyVersionInfo(name, int(v), info["state"], int(v) == entry["primary"], info["created"]))
            return out

    def create_key(self, key_id: str) -> KeyVersionInfo:
        name = key_name_of(key_id)
        with self._mutate() as keys:
            if name in keys:
                raise InvalidInput(f"local key {name!r} already exists")
            keys[name] = _new_key_entry()
        return self._info(name, 1)

    def rotate(self, key_id: str) -> KeyVersionInfo:
        """Add a version and make it primary; older versions keep unwrapping."""
        name = key_name_of(key_id)
        with self._mutate() as keys:
            entry = _entry(keys, name)
            new = max(int(v) for v in entry["versions"]) + 1
            entry["versions"][str(new)] = _new_version()
            entry["primary"] = new
        return self._info(name, new)

    def set_state(self, key_id: str, version: int, enabled: bool) -> KeyVersionInfo:
        """Disable (or re-enable) one version. The primary cannot be disabled: rotate first."""
        name = key_name_of(key_id)
        with self._mutate() as keys:
            entry = _entry(keys, name)
            info = entry["versions"].get(str(version))
            if info is None:
                raise KeyNotFound(f"local key {name!r} has no version {version}")
            if not enabled and version == entry["primary"]:
                raise InvalidInput(f"version {version} is the primary version of {name!r}; rotate before disabling it")
            info["state"] = "enabled" if enabled else "disabled"
        return self._info(name, version)

    def secret(self, purpose: str) -> bytes:
        """A 32-byte secret for another component (the audit log's HMAC key), kept in this file."""
        with self._lock:
            existing = self._keys.get(_SECRETS, {}).get(purpose)
        if existing is None:
            with self._mutate() as keys:
                existing = keys.setdefault(_SECRETS, {}).setdefault(purpose, _b64(os.urandom(32)))
        return base64.b64decode(existing)

    def index_key(self, key_id: str, info: bytes) -> bytes:
        """A 32-byte key derived (HKDF-SHA256, ``info``) from the key's *first* version (blind indexes).

        The first version, not the primary: rotating the master key must not change a
        blind index key, since every index made under it would have to be recomputed.
        """
        self._refresh()
        name = key_name_of(key_id)
        with self._lock:
            entry = self._keys.get(name)
            if entry is None:
                raise KeyNotFound(f"local key {name!r} does not exist; run 'kmsguard keys create'")
            first = min(entry["versions"], key=int)
            material = base64.b64decode(entry["versions"][first]["material"])
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(material)

    # ------------------------------------------------------------------ internals

    def _wrap(self, dek: bytes, request: KeyRequest) -> WrappedKey:
        name = key_name_of(request.key_id)
        with self._lock:
            entry = self._keys.get(name)
            if entry is None:
                raise KeyNotFound(f"local key {name!r} does not exist; run 'kmsguard keys create'")
            version = int(entry["primary"])
            if entry["versions"][str(version)]["state"] != "enabled":
                raise KeyDisabled(f"local key {name!r} v{version} is disabled")
            cipher = self._cipher(name, version)
        ref = f"local:{name}:v{version}"
        nonce = os.urandom(12)
        blob = nonce + cipher.encrypt(nonce, dek, _wrap_aad(ref, request))
        return WrappedKey(PROVIDER, ref, blob)

    def _unwrap_any(self, wrapped: Sequence[WrappedKey], request: KeyRequest) -> bytes:
        disabled: str | None = None
        for entry in wrapped:
            match = _REF_RE.fullmatch(entry.key_ref)
            if entry.provider != PROVIDER or match is None or len(entry.wrapped) != 60:
                continue
            name, version = match[1], int(match[2])
            with self._lock:
                info = self._keys.get(name, {}).get("versions", {}).get(str(version))
                if info is None:
                    continue
                if info["state"] != "enabled":
                    disabled = entry.key_ref
                    continue
                cipher = self._cipher(name, version)
            try:
                nonce, body = entry.wrapped[:12], entry.wrapped[12:]
                return cipher.decrypt(nonce, body, _wrap_aad(entry.key_ref, request))
            except InvalidTag:
                continue
        if disabled is not None:
            raise KeyDisabled(f"key {disabled} is disabled")
        raise InvalidCiphertext()

    def _cipher(self, name: str, version: int) -> AESGCM:
        cipher = self._ciphers.get((name, version))
        if cipher is None:
            material = base64.b64decode(self._keys[name]["versions"][str(version)]["material"])
            cipher = self._ciphers[(name, version)] = AESGCM(material)
        return cipher

    def _info(self, name: str, version: int) -> KeyVersionInfo:
        return next(i for i in self.versions() if i.name == name and i.version == version)

    def _load(self) -> None:
        raw, stamp = _read_file(self.path)
        with self._lock:
            self._kdf, keys = _deserialize(raw, self._passphrase, self.path)
            self._keys = keys
            self._ciphers.clear()
            self._stamp = stamp

    def _refresh(self) -> None:
        """Pick up what another process changed (rotate, disable) before using any key.

        Without this a long-running service would keep wrapping under a version that
        ``kmsguard keys`` has since superseded or disabled. One stat per call; the file
        is re-read only when it was replaced (every write renames a new file into place).
        """
        try:
            stamp = _stamp(os.stat(self.path))
        except OSError:
            return  # keep serving the keys already loaded
        if stamp != self._stamp:
            self._load()

    @contextlib.contextmanager
    def _mutate(self) -> Iterator[dict[str, dict[str, Any]]]:
        """Read-modify-write under an exclusive file lock, so concurrent processes don't lose updates."""
        lock_path = self.path.with_suffix(".lock")
        try:
            fd = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o600)
        except OSError as exc:
            raise KeyringError(f"cannot lock the key file {self.path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            with self._lock:
                self._load()
                keys = json.loads(json.dumps(self._keys))
                yield keys
                _write_file(self.path, _serialize(keys, self._kdf, self._passphrase))
                self._load()
        finally:
            os.close(fd)


# ---------------------------------------------------------------------- file format


def _wrap_aad(key_ref: str, request: KeyRequest) -> bytes:
    bound = json.dumps(sorted(request.bound_context().items()), ensure_ascii=False, separators=(",", ":"))
    return _WRAP_AAD + key_ref.encode("ascii") + b"\x00" + bound.encode("utf-8")


def _entry(keys: Mapping[str, dict[str, Any]], name: str) -> dict[str, Any]:
    entry = keys.get(name)
    if entry is None:
        raise KeyNotFound(f"local key {name!r} does not exist")
    return entry


def _new_version() -> dict[str, str]:
    return {
        "material": _b64(os.urandom(32)),
        "state": "enabled",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _new_key_entry() -> dict[str, Any]:
    return {"primary": 1, "versions": {"1": _new_version()}}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _kek(passphrase: str, kdf: Mapping[str, Any]) -> AESGCM:
    key = Scrypt(
        salt=base64.b64decode(kdf["salt"]), length=32, n=int(kdf["n"]), r=int(kdf["r"]), p=int(kdf["p"])
    ).derive(passphrase.encode("utf-8"))
    return AESGCM(key)


def _serialize(keys: Mapping[str, Any], kdf: Mapping[str, Any] | None, passphrase: str | None) -> bytes:
    doc: dict[str, Any] = {"format": FILE_FORMAT, "version": 1, "kdf": kdf}
    if kdf is None:
        doc["keys"] = keys
    else:
        assert passphrase is not None
        nonce = os.urandom(12)
        sealed = _kek(passphrase, kdf).encrypt(nonce, json.dumps(keys).encode(), FILE_FORMAT.encode())
        doc["sealed"] = _b64(nonce + sealed)
    return json.dumps(doc, indent=2, sort_keys=True).encode("utf-8") + b"\n"


def _deserialize(
    raw: bytes, passphrase: str | None, path: Path
) -> tuple[dict[str, Any] | None, dict[str, dict[str, Any]]]:
    try:
        doc = json.loads(raw)
        if doc.get("format") != FILE_FORMAT or doc.get("version") != 1:
            raise ValueError
        kdf = doc.get("kdf")
        if kdf is None:
            if passphrase:
                # Silently ignoring it would let a user believe the keys are protected.
                raise KeyringError(
                    f"the key file {path} is not sealed with a passphrase; unset KMSGUARD_PASSPHRASE "
                    "(a passphrase can only be chosen at 'kmsguard init')"
                )
            return None, _checked(doc["keys"])
        if not passphrase:
            raise KeyringError(f"the key file {path} is sealed; set KMSGUARD_PASSPHRASE")
        if kdf.get("name") != "scrypt" or not 2**14 <= int(kdf["n"]) <= 2**20:
            raise ValueError
        blob = base64.b64decode(doc["sealed"], validate=True)
        try:
            plain = _kek(passphrase, kdf).decrypt(blob[:12], blob[12:], FILE_FORMAT.encode())
        except InvalidTag:
            raise KeyringError(f"wrong passphrase for the key file {path}") from None
        return dict(kdf), _checked(json.loads(plain))
    except KeyringError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError):
        raise KeyringError(f"the key file {path} is not a valid kmsguard key file") from None


def _checked(keys: Any) -> dict[str, dict[str, Any]]:
    """The key table, if every entry has the shape this module writes; else ValueError.

    Checked once at load so that a hand-edited or damaged file fails here with one clear
    error, not later inside an encrypt with a KeyError.
    """
    if not isinstance(keys, dict):
        raise ValueError
    for name, entry in keys.items():
        if name == _SECRETS:
            if not all(len(base64.b64decode(v, validate=True)) == 32 for v in entry.values()):
                raise ValueError
            continue
        versions = entry["versions"]
        primary = entry["primary"]
        if not _NAME_RE.fullmatch(name) or not isinstance(versions, dict) or not isinstance(primary, int):
            raise ValueError
        if str(primary) not in versions:
            raise ValueError
        for number, info in versions.items():
            if (
                not number.isdigit()
                or number != str(int(number))
                or int(number) < 1
                or info["state"] not in ("enabled", "disabled")
                or not isinstance(info["created"], str)
                or len(base64.b64decode(info["material"], validate=True)) != 32
            ):
                raise ValueError
    return keys


def _stamp(st: os.stat_result) -> tuple[int, int, int]:
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def _read_file(path: Path) -> tuple[bytes, tuple[int, int, int]]:
    """The file's bytes and the identity of the version read (from the same descriptor)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise KeyringError(f"no key file at {path}; run 'kmsguard init'") from None
    except OSError as exc:
        raise KeyringError(f"cannot open the key file {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        mode = st.st_mode
        if not stat.S_ISREG(mode):
            raise KeyringError(f"the key file {path} is not a regular file")
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise KeyringError(
                f"the key file {path} is accessible by group or others "
                f"(mode {stat.S_IMODE(mode):o}); run 'chmod 600 {path}'"
            )
        return fh.read(), _stamp(st)


def _write_file(path: Path, data: bytes, exclusive: bool = False) -> None:
    """Write atomically with mode 0600: temp file, fsync, rename, fsync the directory."""
    if exclusive and path.exists():
        raise KeyringError(f"a key file already exists at {path}; refusing to overwrite it")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise KeyringError(f"cannot write the key file {path}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if exclusive:
            os.link(tmp, path)  # fails if another process created it meanwhile
            os.unlink(tmp)
        else:
            os.replace(tmp, path)
    except FileExistsError:
        os.unlink(tmp)
        raise KeyringError(f"a key file already exists at {path}; refusing to overwrite it") from None
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise KeyringError(f"cannot write the key file {path}: {exc.strerror}") from None
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
