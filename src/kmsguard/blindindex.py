"""Blind indexes: equality lookups on encrypted fields without decrypting them.

``compute(guard, value, classification, name)`` is HMAC-SHA256 of the normalized value
under an *index key* for (classification, name), truncated to ``bits`` and written as
hex. The same value always gives the same index, so a database can index the column and
find "the booking for passport L898902C3" by computing the index of the query value.

Where the index key comes from (it never leaves kmsguard):

* the local keyring derives it (``LocalKeyring.index_key``) from the classification's
  first master-key version with HKDF and an info string of its own, so ``keys rotate``
  does not change it;
* any other keyring (AWS KMS): a random 32-byte key generated once by the key service
  under the classification's key, with the context ``kmsguard:purpose=blind-index`` and
  ``kmsguard:index=<name>``, and stored *wrapped* in ``$KMSGUARD_HOME/index-keys/``. Each
  process unwraps it once (one kms:Decrypt, visible in CloudTrail) and keeps it.

Changing an index key means recomputing every index made under it, so it is never a
side effect: rotate an index by choosing a new name (``passport_idx_v2``), filling it
beside the old one, switching lookups over, then dropping the old column (docs/fields.md).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import os
import re
import threading
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kmsguard.datakey import WrappedKey
from kmsguard.errors import ConfigurationError, InvalidInput, KeyringError
from kmsguard.keyrings.base import KeyRequest, Keyring

if TYPE_CHECKING:
    from kmsguard.guard import Guard

#: A normalizer name, several applied in order, or None for the value as given.
Normalize = str | Sequence[str] | None

_NON_DIGITS = re.compile(r"\D")
NORMALIZERS: dict[str, Callable[[str], str]] = {
    "digits": lambda s: _NON_DIGITS.sub("", s),
    "casefold": str.casefold,
    "strip": str.strip,
}
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
INDEX_DIR = "index-keys"
#: The HKDF info of a local index key: this prefix, then classification and index name.
INDEX_INFO = b"kmsguard v1 blind index\x00"

_keys: weakref.WeakKeyDictionary[Guard, dict[tuple[str, str], bytes]] = weakref.WeakKeyDictionary()
_keys_lock = threading.Lock()


def check_name(name: Any) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidInput("an index name is 1-64 characters of [A-Za-z0-9_-]")
    return name


def normalize(value: str, how: Normalize) -> str:
    if how is None:
        return value
    for name in [how] if isinstance(how, str) else how:
        function = NORMALIZERS.get(name) if isinstance(name, str) else None
        if function is None:
            raise InvalidInput(f"unknown normalizer; known: {', '.join(NORMALIZERS)}")
        value = function(value)
    return value


def compute(guard: Guard, value: str, classification: str, name: str, how: Normalize = None, bits: int = 64) -> str:
    """The blind index of ``value``: hex of HMAC-SHA256(index key, normalized UTF-8), ``bits`` long."""
    if not isinstance(value, str):
        raise InvalidInput("a blind index is computed over a str")
    if not isinstance(bits, int) or isinstance(bits, bool) or bits % 8 or not 32 <= bits <= 256:
        raise InvalidInput("bits must be a multiple of 8 from 32 to 256")
    key = index_key(guard, classification, check_name(name))
    digest = hmac.new(key, normalize(value, how).encode("utf-8", "surrogatepass"), hashlib.sha256).digest()
    return digest[: bits // 8].hex()


def index_key(guard: Guard, classification: str, name: str) -> bytes:
    """The index key for (classification, name), obtained once per Guard and kept in memory."""
    with _keys_lock:
        cached = _keys.setdefault(guard, {}).get((classification, name))
    if cached is not None:
        return cached
    cls = guard.policy.get(classification)
    backend = _backend(guard.keyring)
    derive = getattr(backend, "index_key", None)
    if callable(derive):
        key: bytes = derive(cls.key, INDEX_INFO + f"{cls.name}\x00{name}".encode())
    else:
        request = KeyRequest(cls.name, cls.key, {"kmsguard:purpose": "blind-index", "kmsguard:index": name})
        key = _stored_key(backend, request, _store(guard) / f"{cls.name}.{name}.json")
    with _keys_lock:
        return _keys.setdefault(guard, {}).setdefault((classification, name), key)


def _backend(keyring: Keyring) -> Keyring:
    """The keyring behind any data-key cache: an index key must not sit among cached data keys."""
    while getattr(keyring, "inner", None) is not None:
        keyring = keyring.inner  # type: ignore[attr-defined]
    return keyring


def _store(guard: Guard) -> Path:
    if guard.settings is None:
        raise ConfigurationError("blind indexes with this keyring need a kmsguard home directory (Guard.from_env)")
    return guard.settings.home / INDEX_DIR


def _stored_key(keyring: Keyring, request: KeyRequest, path: Path) -> bytes:
    """Unwrap the stored index key, creating and storing it first if no process has yet."""
    if not path.exists():
        blob = json.dumps(
            [
                {"provider": w.provider, "key_ref": w.key_ref, "wrapped": base64.b64encode(w.wrapped).decode()}
                for w in keyring.generate(request).wrapped
            ]
        ).encode()
        _create(path, blob)  # another process may have won: its key is the one read below
    try:
        entries = json.loads(path.read_bytes())
        wrapped = tuple(WrappedKey(e["provider"], e["key_ref"], base64.b64decode(e["wrapped"])) for e in entries)
    except (OSError, ValueError, KeyError, TypeError):
        raise KeyringError(f"the index key file {path} is unreadable or damaged") from None
    return keyring.unwrap(wrapped, request).plaintext


def _create(path: Path, blob: bytes) -> None:
    """Write ``path`` (mode 0600) unless it exists; atomic, so readers never see half a file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(blob)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    except OSError as exc:
        raise KeyringError(f"cannot write the index key file {path}: {exc.strerror}") from None
