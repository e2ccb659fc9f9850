"""Envelope suite 2, segmented AES-256-GCM: the wire format of a stream. Pure; no I/O.

Suite 2 keeps suite 1's header (magic through the wrapped keys, with ``suite = 2``) and
follows it with (FORMAT.md documents it byte by byte)::

    commitment      32 bytes   HKDF-SHA256(DEK, length 32, salt None, info b"kmsguard stream commit")
    segment_size    u32        plaintext bytes per segment, 4096 .. 16,777,216
    nonce_prefix    7 bytes    random per envelope
    segments        each: AES-256-GCM(enc_key, nonce_i, segment_i, aad) = ciphertext || 16-byte tag

    enc_key  = HKDF-SHA256(DEK, length 32, salt None, info b"kmsguard stream enc")
    nonce_i  = nonce_prefix || i as u32 || last (1 for the final segment, else 0)
    aad      = the header from its first byte through nonce_prefix, wrapped keys left out

The plaintext is cut into ``max(1, ceil(n / segment_size))`` segments, all full but the
last, which holds 1..segment_size bytes (0 only for an empty plaintext). Each segment's
nonce names its position and whether it ends the stream, so a reordered, dropped,
duplicated or truncated segment fails its tag; the associated data binds every segment
to its envelope's header and nonce prefix, so a segment moved from another envelope
fails too, even under the same data key. Suite 2's keys have their own HKDF info
strings: it never shares an AES key with suite 1, even when one cached data key serves both.

Because every segment but the last has one size, the segment holding any plaintext offset
is found by arithmetic: :func:`layout` is what random access needs.
"""

from __future__ import annotations

import hmac
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from kmsguard import envelope
from kmsguard.errors import InvalidCiphertext, InvalidInput

SUITE = 2
COMMITMENT_SIZE = 32
PREFIX_SIZE = 7
TAG_SIZE = envelope.TAG_SIZE
MIN_SEGMENT_SIZE = 4096
MAX_SEGMENT_SIZE = 16 * 1024 * 1024
DEFAULT_SEGMENT_SIZE = 65536
#: The segment index is a u32 and the value 2^32 - 1 is never used, so at most this many.
MAX_SEGMENTS = 2**32 - 1
#: After the shared header: commitment, segment size, nonce prefix.
TAIL_SIZE = COMMITMENT_SIZE + 4 + PREFIX_SIZE
#: The most bytes a suite-2 header can take (every shared field at its maximum), so a
#: reader knows how much to read before it can parse one.
MAX_HEADER_SIZE = (
    4
    + 1
    + 32
    + envelope.MAX_CONTEXT_BYTES
    + 1
    + envelope.MAX_WRAPPED_KEYS * (1 + 32 + 2 + 2048 + 2 + envelope.MAX_WRAPPED_SIZE)
    + TAIL_SIZE
)

_INFO_ENC = b"kmsguard stream enc"
_INFO_COMMIT = b"kmsguard stream commit"
_U32 = struct.Struct(">I")
_INDEX = struct.Struct(">IB")


def _hkdf(dek: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(dek)


class StreamKey:
    """The suite-2 keys of one data key: the segment AEAD and the commitment."""

    __slots__ = ("aead", "commitment")

    def __init__(self, dek: bytes) -> None:
        self.aead = AESGCM(_hkdf(dek, _INFO_ENC))
        self.commitment = _hkdf(dek, _INFO_COMMIT)

    def __repr__(self) -> str:
        return "StreamKey(<redacted>)"


def check_segment_size(size: int) -> int:
    if type(size) is not int or not MIN_SEGMENT_SIZE <= size <= MAX_SEGMENT_SIZE:
        raise InvalidInput(f"segment_size must be an int from {MIN_SEGMENT_SIZE} to {MAX_SEGMENT_SIZE}")
    return size


def segment_nonce(prefix: bytes, index: int, last: bool) -> bytes:
    """The 12-byte nonce of segment ``index``: the envelope's prefix, the index, the last flag."""
    if not 0 <= index < MAX_SEGMENTS:
        raise InvalidInput("a stream holds at most 2^32 - 1 segments")
    return prefix + _INDEX.pack(index, 1 if last else 0)


def segment_count(size: int, segment_size: int) -> int:
    """How many segments ``size`` plaintext bytes take: at least one, even for none."""
    return max(1, -(-size // segment_size))


@dataclass(frozen=True, slots=True)
class StreamHeader:
    """A parsed suite-2 header; ``size`` bytes long, after which the segments start."""

    header: envelope.Header
    commitment: bytes
    segment_size: int
    nonce_prefix: bytes
    aad: bytes
    size: int

    @property
    def classification(self) -> str:
        return self.header.classification


def encode(shared: bytes, wrapped: bytes, commitment: bytes, segment_size: int, prefix: bytes) -> bytes:
    """A suite-2 header from suite 1's encoded header ``shared`` (magic through context) and
    wrapped-keys section ``wrapped``."""
    if len(prefix) != PREFIX_SIZE:
        raise InvalidInput("a nonce prefix must be 7 bytes")
    check_segment_size(segment_size)
    return b"".join((shared[:3], bytes((SUITE,)), shared[4:], wrapped, commitment, _U32.pack(segment_size), prefix))


def parse(buf: bytes) -> StreamHeader:
    """Parse the suite-2 header at the start of ``buf`` (which may hold segments after it)."""
    head = envelope.parse_header(buf)
    pos = head.wrapped_end
    if head.suite != SUITE or len(buf) - pos < TAIL_SIZE:
        raise InvalidCiphertext()
    commitment = buf[pos : pos + COMMITMENT_SIZE]
    (segment_size,) = _U32.unpack_from(buf, pos + COMMITMENT_SIZE)
    if not MIN_SEGMENT_SIZE <= segment_size <= MAX_SEGMENT_SIZE:
        raise InvalidCiphertext()
    end = pos + TAIL_SIZE
    return StreamHeader(
        header=head,
        commitment=commitment,
        segment_size=segment_size,
        nonce_prefix=buf[end - PREFIX_SIZE : end],
        aad=buf[: head.wrapped_start] + buf[pos:end],
        size=end,
    )


def check_commitment(key: StreamKey, header: StreamHeader) -> None:
    """The data key must be the one the header commits to (constant-time compare)."""
    if not hmac.compare_digest(key.commitment, header.commitment):
        raise InvalidCiphertext()


@dataclass(frozen=True, slots=True)
class Layout:
    """Where the segments of a suite-2 envelope of a known total length lie."""

    segment_size: int
    header_size: int
    count: int
    #: Plaintext bytes in the last segment.
    last_size: int

    @property
    def plaintext_size(self) -> int:
        return (self.count - 1) * self.segment_size + self.last_size

    def offset(self, index: int) -> int:
        """The byte offset of segment ``index`` in the envelope."""
        return self.header_size + index * (self.segment_size + TAG_SIZE)

    def length(self, index: int) -> int:
        """The stored length of segment ``index`` (ciphertext and tag)."""
        return (self.last_size if index == self.count - 1 else self.segment_size) + TAG_SIZE


def layout(header: StreamHeader, total: int) -> Layout:
    """The segments of an envelope ``total`` bytes long with ``header``; InvalidCiphertext if no
    valid envelope has that length. Only the last segment's tag authenticates the length."""
    body = total - header.size
    stored = header.segment_size + TAG_SIZE
    if body < TAG_SIZE:
        raise InvalidCiphertext()
    count = -(-body // stored)
    last = body - (count - 1) * stored - TAG_SIZE
    if count > MAX_SEGMENTS or (last == 0 and count > 1) or last < 0:
        raise InvalidCiphertext()
    return Layout(header.segment_size, header.size, count, last)


def open_into(
    key: StreamKey, header: StreamHeader, index: int, last: bool, stored: memoryview, out: memoryview
) -> None:
    """Authenticate and decrypt one stored segment into ``out`` (``len(stored) - 16`` bytes)."""
    if index >= MAX_SEGMENTS:
        raise InvalidCiphertext()
    try:
        key.aead.decrypt_into(segment_nonce(header.nonce_prefix, index, last), stored, header.aad, out)
    except (InvalidTag, ValueError):
        raise InvalidCiphertext() from None
