"""The kmsguard envelope, version 1: build, parse and authenticate. Pure; no I/O.

Wire layout (all integers unsigned big-endian; FORMAT.md documents it byte by byte)::

    offset  size          field
    0       2             magic "KG"
    2       1             version = 1
    3       1             suite = 1 (AES-256-GCM, HKDF-SHA256 key derivation, key commitment)
    4       1 + n         classification: u8 n, then n ASCII bytes of [a-z0-9_-], 1 <= n <= 32
    .       2 + ...       context: u16 pair count, then per pair u16 len + UTF-8 key,
                          u16 len + UTF-8 value; keys non-empty, unique and sorted by their
                          UTF-8 bytes; the whole section (count included) at most 8192 bytes
    .       1 + ...       wrapped keys: u8 count (1..8), then per key
                          u8 len + provider id (ASCII [a-z0-9-], 1..32),
                          u16 len + key reference (printable ASCII, 1..2048),
                          u16 len + wrapped data key (1..4096 bytes)
    .       32            commitment = HKDF-SHA256(DEK, info=b"kmsguard v1 commit")
    .       12            nonce (random per message)
    .       >= 16         body: AES-256-GCM(enc_key, nonce, plaintext, aad) = ciphertext || tag

    aad = every byte from offset 0 through the nonce, except the wrapped-keys section.

Leaving the wrapped keys out of the associated data is what lets :func:`replace_wrapped_keys`
re-wrap or add a region without re-encrypting the body; everything else is authenticated,
and the commitment binds the body to exactly one data key.

Parsing checks every length against the bytes that remain *before* reading, rejects
trailing bytes and non-canonical encodings, and raises the single :class:`InvalidCiphertext`
for anything wrong, so no caller (or attacker) learns which check failed.
"""

from __future__ import annotations

import hmac
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import pybase64
from cryptography.exceptions import InvalidTag

from kmsguard import fastpath, nonces
from kmsguard.datakey import DataKey, WrappedKey
from kmsguard.errors import InvalidCiphertext, InvalidInput

MAGIC = b"KG"
VERSION = 1
SUITE = 1
TEXT_PREFIX = "kg1:"

COMMITMENT_SIZE = 32
NONCE_SIZE = nonces.NONCE_SIZE
TAG_SIZE = 16
MAX_CONTEXT_BYTES = 8192
MAX_WRAPPED_KEYS = 8
MAX_WRAPPED_SIZE = 4096
#: cryptography's AESGCM refuses inputs of 2^31 bytes or more.
MAX_PLAINTEXT = 2**31 - 1 - TAG_SIZE

_CLASSIFICATION_RE = re.compile(rb"[a-z0-9_-]{1,32}")
_PROVIDER_RE = re.compile(rb"[a-z0-9-]{1,32}")
_KEY_REF_RE = re.compile(rb"[\x21-\x7e]{1,2048}")
_TEXT_PREFIX_BYTES = TEXT_PREFIX.encode("ascii")
_B64URL_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
#: The bits of a text's last character that hold no data, by how many characters end it (len % 4).
_SPARE_BITS = {2: 0b1111, 3: 0b11}

_U16 = struct.Struct(">H")
#: Every sealed message's nonce: uniformly random, from the OS CSPRNG (drawn in bulk, see kmsguard.nonces).
_fresh_nonce = nonces.nonce
_FIXED_PREFIX = MAGIC + bytes((VERSION, SUITE))
_NO_CONTEXT: Mapping[str, str] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Envelope:
    """A parsed, not yet authenticated envelope. ``aad`` is what the body's tag covers.

    The body is not copied out of ``raw``: :func:`unseal` decrypts straight from it, so a
    large envelope costs one buffer (the plaintext) on decrypt, not two.
    """

    classification: str
    context: Mapping[str, str]
    wrapped_keys: tuple[WrappedKey, ...]
    commitment: bytes
    nonce: bytes
    aad: bytes
    raw: bytes
    body_offset: int
    version: int = VERSION
    suite: int = SUITE

    @property
    def plaintext_size(self) -> int:
        return len(self.raw) - self.body_offset - TAG_SIZE


# --------------------------------------------------------------------------- building


def encode_header(classification: str, context: Mapping[str, str]) -> bytes:
    """Magic through context: the authenticated header. Validates caller input."""
    name = _ascii(classification, _CLASSIFICATION_RE, "classification must be 1-32 characters of [a-z0-9_-]")
    pairs = []
    for key, value in context.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise InvalidInput("encryption context keys and values must be strings")
        try:
            kb, vb = key.encode("utf-8"), value.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidInput("encryption context must be valid UTF-8 text") from None
        if not kb:
            raise InvalidInput("encryption context keys must not be empty")
        pairs.append((kb, vb))
    pairs.sort()
    out = bytearray(_FIXED_PREFIX)
    out.append(len(name))
    out += name
    section = bytearray(_U16.pack(len(pairs)))
    for kb, vb in pairs:
        if len(kb) > 0xFFFF or len(vb) > 0xFFFF:
            raise InvalidInput("encryption context is larger than 8192 bytes")
        section += _U16.pack(len(kb)) + kb + _U16.pack(len(vb)) + vb
    if len(section) > MAX_CONTEXT_BYTES:
        raise InvalidInput("encryption context is larger than 8192 bytes")
    if len(pairs) > 0xFFFF:  # unreachable within 8 KiB, kept for the reader of the format
        raise InvalidInput("too many encryption context pairs")
    out += section
    return bytes(out)


def _ascii(text: str, pattern: re.Pattern[bytes], message: str) -> bytes:
    """``text`` as ASCII bytes matching ``pattern``; never a lossy encoding of something else."""
    if not isinstance(text, str) or not text.isascii():
        raise InvalidInput(message)
    raw = text.encode("ascii")
    if not pattern.fullmatch(raw):
        raise InvalidInput(message)
    return raw


def encode_wrapped_keys(wrapped: tuple[WrappedKey, ...]) -> bytes:
    if not 1 <= len(wrapped) <= MAX_WRAPPED_KEYS:
        raise InvalidInput("an envelope carries 1 to 8 wrapped keys")
    out = bytearray((len(wrapped),))
    for w in wrapped:
        provider = _ascii(w.provider, _PROVIDER_RE, "a provider id must be 1-32 characters of [a-z0-9-]")
        ref = _ascii(w.key_ref, _KEY_REF_RE, "a key reference must be 1-2048 printable ASCII characters")
        if not 1 <= len(w.wrapped) <= MAX_WRAPPED_SIZE:
            raise InvalidInput("a wrapped data key must be 1-4096 bytes")
        out.append(len(provider))
        out += provider
        out += _U16.pack(len(ref)) + ref
        out += _U16.pack(len(w.wrapped)) + w.wrapped
    return bytes(out)


class Sealer:
    """Seals messages under one data key, classification and context.

    The header, the wrapped-keys section and the commitment are encoded once here, so
    sealing a message costs one AES-GCM call, a random nonce and a concatenation. Guard
    keeps the result for a cached data key as a plan's lane (kmsguard.plans), not the Sealer:
    a Sealer holds its key, and the key nothing of the Sealer's.
    """

    __slots__ = ("_aead", "aad_prefix", "data_key", "out_prefix")

    def __init__(
        self,
        data_key: DataKey,
        classification: str = "",
        context: Mapping[str, str] = _NO_CONTEXT,
        *,
        header: bytes | None = None,
    ) -> None:
        """For ``classification`` and ``context``, or for an already encoded ``header``."""
        if header is None:
            header = encode_header(classification, context)
        self.data_key = data_key
        self._aead = data_key.aead
        self.aad_prefix = header + data_key.commitment
        self.out_prefix = header + encode_wrapped_keys(data_key.wrapped) + data_key.commitment

    def seal(self, plaintext: bytes, nonce: bytes | None = None) -> bytes:
        """Encrypt one message. ``nonce`` is for known-answer tests only; leave it None."""
        if len(plaintext) > MAX_PLAINTEXT:
            raise InvalidInput("plaintext is too large for one envelope")
        self.data_key.use()
        if nonce is None:
            nonce = _fresh_nonce()
        elif len(nonce) != NONCE_SIZE:
            raise InvalidInput("a nonce must be 12 bytes")
        if type(plaintext) is bytes and len(plaintext) >= fastpath.SEAL_INTO_FROM:  # into the envelope itself
            return fastpath.sealed(self._aead, self.out_prefix, nonce, plaintext, self.aad_prefix + nonce)
        return b"".join((self.out_prefix, nonce, self._aead.encrypt(nonce, plaintext, self.aad_prefix + nonce)))


# --------------------------------------------------------------------------- parsing


def parse(data: bytes | bytearray | memoryview) -> Envelope:
    """Parse an envelope's structure strictly. Authenticates nothing: see :func:`unseal`."""
    try:
        return _parse(bytes(data))
    except InvalidCiphertext:
        raise
    except (IndexError, ValueError, struct.error, TypeError):
        raise InvalidCiphertext() from None


def _parse(buf: bytes) -> Envelope:
    # Smallest possible: fixed 4 + class 2 + context 2 + one wrapped key 1+2+3+2+1
    # + commitment + nonce + tag. Checked first so short inputs cost nothing.
    if len(buf) < 4 + 2 + 2 + 9 + COMMITMENT_SIZE + NONCE_SIZE + TAG_SIZE or buf[:4] != _FIXED_PREFIX:
        raise InvalidCiphertext()
    head = _parse_header(buf)
    pos = head.wrapped_end
    if len(buf) - pos < COMMITMENT_SIZE + NONCE_SIZE + TAG_SIZE:
        raise InvalidCiphertext()
    commitment = buf[pos : pos + COMMITMENT_SIZE]
    nonce = buf[pos + COMMITMENT_SIZE : pos + COMMITMENT_SIZE + NONCE_SIZE]
    body_start = pos + COMMITMENT_SIZE + NONCE_SIZE
    return Envelope(
        classification=head.classification,
        context=head.context,
        wrapped_keys=head.wrapped_keys,
        commitment=commitment,
        nonce=nonce,
        aad=buf[: head.wrapped_start] + buf[pos:body_start],
        raw=buf,
        body_offset=body_start,
    )


@dataclass(frozen=True, slots=True)
class Header:
    """The part every suite shares, magic through wrapped keys, parsed (see :func:`parse_header`).

    ``wrapped_start`` and ``wrapped_end`` delimit the wrapped-keys section, which no
    suite's associated data covers.
    """

    suite: int
    classification: str
    context: Mapping[str, str]
    wrapped_keys: tuple[WrappedKey, ...]
    wrapped_start: int
    wrapped_end: int


def parse_header(buf: bytes) -> Header:
    """Parse the shared header at the start of ``buf`` strictly; what follows it is the caller's.

    ``buf`` may hold more than the header (a stream's first bytes): the suite's own
    fields start at ``wrapped_end``. The suite byte is returned, not checked.
    """
    try:
        return _parse_header(buf)
    except InvalidCiphertext:
        raise
    except (IndexError, ValueError, struct.error, TypeError):
        raise InvalidCiphertext() from None


def _parse_header(buf: bytes) -> Header:
    end = len(buf)
    if end < 5 or buf[:3] != _FIXED_PREFIX[:3]:
        raise InvalidCiphertext()
    pos = 4

    n = buf[pos]
    pos += 1
    if pos + n > end:
        raise InvalidCiphertext()
    name = buf[pos : pos + n]
    if not _CLASSIFICATION_RE.fullmatch(name):
        raise InvalidCiphertext()
    pos += n

    ctx_start = pos
    if pos + 2 > end:
        raise InvalidCiphertext()
    (count,) = _U16.unpack_from(buf, pos)
    pos += 2
    context: dict[str, str] = {}
    previous = b""
    for i in range(count):
        key_bytes, pos = _read_u16_bytes(buf, pos, end)
        value_bytes, pos = _read_u16_bytes(buf, pos, end)
        if not key_bytes or (i and key_bytes <= previous):
            raise InvalidCiphertext()  # empty, duplicate or unsorted key
        if pos - ctx_start > MAX_CONTEXT_BYTES:
            raise InvalidCiphertext()
        previous = key_bytes
        context[key_bytes.decode("utf-8")] = value_bytes.decode("utf-8")

    wrapped_start = pos
    if pos + 1 > end:
        raise InvalidCiphertext()
    wcount = buf[pos]
    pos += 1
    if not 1 <= wcount <= MAX_WRAPPED_KEYS:
        raise InvalidCiphertext()
    wrapped = []
    for _ in range(wcount):
        plen = buf[pos] if pos < end else -1
        pos += 1
        if plen < 1 or pos + plen > end:
            raise InvalidCiphertext()
        provider = buf[pos : pos + plen]
        pos += plen
        ref, pos = _read_u16_bytes(buf, pos, end)
        blob, pos = _read_u16_bytes(buf, pos, end)
        if (
            not _PROVIDER_RE.fullmatch(provider)
            or not _KEY_REF_RE.fullmatch(ref)
            or not 1 <= len(blob) <= MAX_WRAPPED_SIZE
        ):
            raise InvalidCiphertext()
        wrapped.append(WrappedKey(provider.decode("ascii"), ref.decode("ascii"), blob))
    return Header(
        suite=buf[3],
        classification=name.decode("ascii"),
        context=MappingProxyType(context),
        wrapped_keys=tuple(wrapped),
        wrapped_start=wrapped_start,
        wrapped_end=pos,
    )


def _read_u16_bytes(buf: bytes, pos: int, end: int) -> tuple[bytes, int]:
    if pos + 2 > end:
        raise InvalidCiphertext()
    (length,) = _U16.unpack_from(buf, pos)
    pos += 2
    if pos + length > end:
        raise InvalidCiphertext()
    return buf[pos : pos + length], pos + length


# --------------------------------------------------------------------------- opening


def unseal(data_key: DataKey, envelope: Envelope) -> bytes:
    """Check the key commitment in constant time, then authenticate and decrypt the body."""
    body = memoryview(envelope.raw)[envelope.body_offset :]
    return open_body(data_key, envelope.commitment, envelope.nonce, body, envelope.aad)


def open_body(data_key: DataKey, commitment: bytes, nonce: bytes, body: bytes | memoryview, aad: bytes) -> bytes:
    """:func:`unseal` from an envelope's parts, for callers that memoize parsed headers."""
    if not hmac.compare_digest(data_key.commitment, commitment):
        raise InvalidCiphertext()
    try:
        return data_key.aead.decrypt(nonce, body, aad)
    except InvalidTag:
        raise InvalidCiphertext() from None


def replace_wrapped_keys(data: bytes, wrapped: tuple[WrappedKey, ...]) -> bytes:
    """The same envelope with another wrapped-keys section; the body is untouched.

    Only the section outside the associated data changes, so the result opens with the
    same data key and its tag still covers every other byte.
    """
    env = parse(data)
    header_len = len(env.aad) - COMMITMENT_SIZE - NONCE_SIZE
    tail = memoryview(env.raw)[env.body_offset - COMMITMENT_SIZE - NONCE_SIZE :]
    return b"".join((env.aad[:header_len], encode_wrapped_keys(wrapped), tail))


# --------------------------------------------------------------------------- text form


def to_text(data: bytes) -> str:
    """``kg1:`` + base64url without padding: safe in database columns, JSON and URLs."""
    return to_text_bytes(data).decode("ascii")


def to_text_bytes(data: bytes) -> bytes:
    """:func:`to_text` as ASCII bytes, for output built as bytes (the service's batch answers)."""
    return _TEXT_PREFIX_BYTES + pybase64.b64encode(data, altchars=b"-_").rstrip(b"=")


def from_text(token: str) -> bytes:
    """Decode the text form strictly: right prefix, URL alphabet, no padding, canonical.

    One strict decoding pass: pybase64 refuses any character outside base64 (the standard
    alphabet's ``+/`` and padding are refused before). Of the texts that decode, only the
    canonical one of its bytes is accepted: the bits of the last character past the last
    byte (4 of them when 2 characters are left over, 2 when 3 are) must be zero.
    """
    if not isinstance(token, str) or not token.startswith(TEXT_PREFIX):
        raise InvalidCiphertext()
    payload = token[len(TEXT_PREFIX) :]
    tail = len(payload) % 4
    if not payload or tail == 1 or "+" in payload or "/" in payload or "=" in payload:
        raise InvalidCiphertext()
    if tail and _B64URL_ALPHABET.find(payload[-1]) & _SPARE_BITS[tail]:  # find: -1 sets every bit
        raise InvalidCiphertext()
    try:
        return pybase64.b64decode(payload + "=" * (4 - tail if tail else 0), altchars=b"-_", validate=True)
    except ValueError:  # binascii.Error, or a non-ASCII character
        raise InvalidCiphertext() from None


def coerce(value: bytes | bytearray | memoryview | str) -> bytes:
    """Accept either form: ``kg1:`` text or the binary envelope."""
    if isinstance(value, str):
        return from_text(value)
    if not isinstance(value, bytes | bytearray | memoryview):
        raise InvalidInput("an envelope is bytes or a kg1: string")
    data = bytes(value)
    if data.startswith(TEXT_PREFIX.encode("ascii")):
        try:
            return from_text(data.decode("ascii").strip())
        except UnicodeDecodeError:
            raise InvalidCiphertext() from None
    return data
