"""Streams: envelope suite 2 (kmsguard.segments) over file objects, in bounded memory.

Guard's ``encrypt_stream``, ``decrypt_stream``, ``open_encrypted`` and the suite-2 cases
of ``decrypt`` and ``rewrap`` are carried out here, each as one Guard operation (audited
with its size). Memory stays at a few segments whatever the stream's size: encrypt holds
two plaintext segments (the one being sealed and the next, read ahead to know whether
the current one is the last) and one sealed segment; decrypt the same the other way.

A stream's data key comes from the keyring like any envelope's. The data-key cache may
lend a key that other streams or messages use too: each stream has its own random nonce
prefix, and suite 2's keys are derived with their own HKDF info strings.

A reader never releases a segment's plaintext before its tag verifies, and the last
segment's nonce says it is the last, so a truncated stream fails at its end. Decrypting
into a file object therefore writes the verified segments before the stream is known
to be whole: a caller who must not see a partial result (the CLI) writes to a temporary
file and renames it once ``decrypt_stream`` returns.
"""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import IO, TYPE_CHECKING, Any, Protocol

from kmsguard import envelope, operation, plans, segments
from kmsguard.datakey import DataKey
from kmsguard.errors import InvalidCiphertext, InvalidInput, UnknownClassification
from kmsguard.policy import ClassPolicy

if TYPE_CHECKING:
    from kmsguard.guard import Guard

#: What a stream reads from: a binary file object, or an iterable of bytes-like chunks.
Source = IO[bytes] | Iterable[bytes]


class Sink(Protocol):
    """What a stream writes to: anything with a binary file's ``write`` (blocking: a raw file
    in non-blocking mode is not a stream's sink)."""

    def write(self, data: Any, /) -> int | None: ...


#: The size a stream of unknown length is announced to the data-key cache as: more than any
#: ``max_bytes``, so it gets a key of its own.
_UNKNOWN_SIZE = 2**62
_TAG = segments.TAG_SIZE


class _Chunks:
    """Fills buffers from a file object or an iterable of chunks, after any bytes already read."""

    def __init__(self, source: Source) -> None:
        self._pending = memoryview(b"")
        self._readinto = getattr(source, "readinto", None)
        self._read = getattr(source, "read", None)
        self._chunks: Iterator[Any] | None = None
        if self._readinto is None and self._read is None:
            if isinstance(source, bytes | bytearray | memoryview | str) or not isinstance(source, Iterable):
                raise InvalidInput("a stream's source is a binary file object or an iterable of bytes chunks")
            self._chunks = iter(source)

    def fill(self, buf: memoryview) -> int:
        """Fill ``buf`` as far as the source allows; fewer bytes than its length only at the end."""
        want = len(buf)
        got = 0
        while got < want:
            if self._pending:
                n = min(len(self._pending), want - got)
                buf[got : got + n] = self._pending[:n]
                self._pending = self._pending[n:]
                got += n
            elif self._readinto is not None:
                n = self._readinto(buf[got:])
                if not n:
                    break
                got += n
            elif not self._next(want - got):
                break
        return got

    def drain(self) -> bytes:
        """Everything left (a suite-1 envelope, which is one message)."""
        out = bytearray()
        chunk = memoryview(bytearray(1 << 20))
        while n := self.fill(chunk):
            out += chunk[:n]
        return bytes(out)

    def unread(self, data: bytes) -> None:
        """Give back ``data`` (read ahead): the next fill starts with it."""
        self._pending = memoryview(data)

    def _next(self, room: int) -> bool:
        """Take the next chunk from a source without ``readinto``; False at its end."""
        if self._read is not None:
            chunk = self._read(room)
        else:
            assert self._chunks is not None
            chunk = next(self._chunks, None)
            while chunk is not None and not chunk:
                chunk = next(self._chunks, None)
        if not chunk:
            return False
        if not isinstance(chunk, bytes | bytearray | memoryview):
            raise InvalidInput("a stream's chunks must be bytes")
        self._pending = memoryview(chunk).cast("B")
        return True


def write_all(sink: Sink, data: memoryview) -> None:
    """``sink.write`` until every byte is taken (a raw file may take fewer; a ``write`` that
    returns None, as many file-like objects' do, took them all)."""
    n = sink.write(data)
    while n is not None and n < len(data):
        data = data[n:]
        n = sink.write(data)


def _size_hint(source: Source) -> int:
    """The bytes left in a regular file, for the data-key cache's byte limit; else 'unknown'."""
    try:
        fd = source.fileno()  # type: ignore[union-attr]
        return max(0, os.fstat(fd).st_size - source.tell())  # type: ignore[union-attr]
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return _UNKNOWN_SIZE


# --------------------------------------------------------------------------- sealing and opening


def seal(
    key: segments.StreamKey, head: bytes, header: segments.StreamHeader, source: Source | _Chunks, sink: Sink
) -> int:
    """Write suite-2 envelope ``head`` (its encoded header) and ``source`` sealed after it; the plaintext size.

    Each segment is read into one of two buffers and sealed into a third with
    ``encrypt_into``: no allocation per segment (the loop runs once per 64 KiB by default,
    where AES-GCM itself takes microseconds).
    """
    size = header.segment_size
    chunks = source if isinstance(source, _Chunks) else _Chunks(source)
    current, ahead = memoryview(bytearray(size)), memoryview(bytearray(size))
    sealed = memoryview(bytearray(size + _TAG))
    fill, seal_into, aad, prefix = chunks.fill, key.aead.encrypt_into, header.aad, header.nonce_prefix
    write_all(sink, memoryview(head))
    n = fill(current)
    total = 0
    index = 0
    while True:
        m = fill(ahead) if n == size else 0
        out = sealed if n == size else sealed[: n + _TAG]
        seal_into(segments.segment_nonce(prefix, index, m == 0), current if n == size else current[:n], aad, out)
        write_all(sink, out)
        total += n
        if m == 0:
            return total
        index += 1
        current, ahead, n = ahead, current, m


def open_segments(key: segments.StreamKey, header: segments.StreamHeader, chunks: _Chunks, sink: Sink) -> int:
    """Verify and decrypt every segment after ``header`` into ``sink``; the plaintext size."""
    stored = header.segment_size + _TAG
    current, ahead = memoryview(bytearray(stored)), memoryview(bytearray(stored))
    plain = memoryview(bytearray(header.segment_size))
    fill = chunks.fill
    n = fill(current)
    total = 0
    index = 0
    while True:
        m = fill(ahead) if n == stored else 0
        last = m == 0
        if n < _TAG or (last and index and n == _TAG):
            raise InvalidCiphertext()  # cut inside a tag, or an empty segment after others
        out = plain if n == stored else plain[: n - _TAG]
        segments.open_into(key, header, index, last, current if n == stored else current[:n], out)
        write_all(sink, out)
        total += n - _TAG
        if last:
            return total
        index += 1
        current, ahead, n = ahead, current, m


def read_header(source: Source) -> tuple[bytes, _Chunks]:
    """The first bytes of an envelope (enough for any suite-2 header, or all of a shorter one)
    and a reader of the rest."""
    chunks = _Chunks(source)
    first = memoryview(bytearray(segments.MAX_HEADER_SIZE))
    n = chunks.fill(first)
    return bytes(first[:n]), chunks


# --------------------------------------------------------------------------- Guard's operations


def encrypt(
    guard: Guard,
    source: Source,
    sink: Sink,
    classification: str,
    context: Mapping[str, str] | None,
    segment_size: int | None,
) -> int:
    """Guard.encrypt_stream: a data key for the plan, then :func:`seal`."""
    size = segments.check_segment_size(segments.DEFAULT_SEGMENT_SIZE if segment_size is None else segment_size)
    plan = guard._plans.encrypt_plan(classification, context)
    chunks = _Chunks(source)  # a bad source is refused before a key is made
    op = operation.current.get()
    if op is not None:
        _note(op, plan.policy, plan.context, ())
    data_key, _budget = guard._lend(plan.request, _size_hint(source))
    if op is not None:
        _note(op, plan.policy, plan.context, [w.key_ref for w in data_key.wrapped])
    key = segments.StreamKey(data_key.plaintext)
    head = segments.encode(
        plan.header,
        envelope.encode_wrapped_keys(data_key.wrapped),
        key.commitment,
        size,
        os.urandom(segments.PREFIX_SIZE),
    )
    header = segments.parse(head)
    total = seal(key, head, header, chunks, sink)
    if op is not None:
        op.size = total
    return total


def decrypt(guard: Guard, first: bytes, chunks: _Chunks, sink: Sink, ctx: Mapping[str, str]) -> int:
    """Guard.decrypt_stream of a suite-2 envelope whose first bytes are ``first``."""
    header = segments.parse(first)
    key = _key(guard, header, ctx)
    chunks.unread(first[header.size :])
    total = open_segments(key, header, chunks, sink)
    op = operation.current.get()
    if op is not None:
        op.size = total
    return total


def decrypt_bytes(guard: Guard, raw: bytes, ctx: Mapping[str, str]) -> bytes:
    """Guard.decrypt of a suite-2 envelope held in memory."""
    out = io.BytesIO()
    decrypt(guard, raw[: segments.MAX_HEADER_SIZE], _Chunks(io.BytesIO(raw[segments.MAX_HEADER_SIZE :])), out, ctx)
    return out.getvalue()


def rewrap_bytes(guard: Guard, raw: bytes, ctx: Mapping[str, str]) -> bytes:
    """Guard.rewrap of a suite-2 envelope: authenticate every segment, then replace the wrapped
    keys; the segments are kept byte for byte."""
    header = segments.parse(raw[: segments.MAX_HEADER_SIZE])
    plan, key = _plan_and_key(guard, header, ctx, rewrap=True)
    open_segments(key, header, _Chunks(io.BytesIO(raw[header.size :])), _Discard())
    wrapped = guard.keyring.rewrap(header.header.wrapped_keys, plan.request)
    op = operation.current.get()
    if op is not None:
        op.key_refs.clear()
        _note(op, plan.policy, ctx, [w.key_ref for w in wrapped])
    head = header.header
    return b"".join((raw[: head.wrapped_start], envelope.encode_wrapped_keys(wrapped), raw[head.wrapped_end :]))


def open_file(guard: Guard, source: IO[bytes], ctx: Mapping[str, str], owned: bool) -> EncryptedFile:
    """Guard.open_encrypted: the header checked and the key unwrapped now; segments on demand."""
    source.seek(0)
    first = source.read(segments.MAX_HEADER_SIZE)
    header = segments.parse(first)
    key = _key(guard, header, ctx)
    total = source.seek(0, io.SEEK_END)
    reader = EncryptedFile(source, key, header, segments.layout(header, total), owned)
    op = operation.current.get()
    if op is not None:
        op.size = reader.size
    return reader


def _key(guard: Guard, header: segments.StreamHeader, ctx: Mapping[str, str]) -> segments.StreamKey:
    return _plan_and_key(guard, header, ctx)[1]


def _plan_and_key(
    guard: Guard, header: segments.StreamHeader, ctx: Mapping[str, str], rewrap: bool = False
) -> tuple[plans.DecryptPlan, segments.StreamKey]:
    """Apply the policy to the header (as Guard's decrypt does), unwrap, and check the commitment."""
    head = header.header
    try:
        cls = guard.policy.get(head.classification)
    except UnknownClassification:  # naming no configured class is as bad as tampering
        raise InvalidCiphertext() from None
    # A stream's plan holds the same decisions as a suite-1 envelope's; it is not kept.
    env = envelope.Envelope(
        head.classification, head.context, head.wrapped_keys, header.commitment, header.nonce_prefix,
        header.aad, b"", header.size, suite=segments.SUITE,
    )  # fmt: skip
    plan = plans.DecryptPlan(cls, env, guard.policy.request(cls, head.context))
    op = operation.current.get()
    if op is not None:
        _note(op, cls, ctx, ())
    error = plans.context_error(plan, ctx)
    if error is not None:
        raise error
    if op is not None:
        _note(op, cls, ctx, [w.key_ref for w in head.wrapped_keys])
    # Rewrap asks the keyring itself, as Guard's rewrap of suite 1 does.
    if rewrap:
        data_key: DataKey = guard.keyring.unwrap(head.wrapped_keys, plan.request)
    else:
        data_key = guard._unwrap(head.wrapped_keys, plan.request)[0]
    key = segments.StreamKey(data_key.plaintext)
    segments.check_commitment(key, header)
    return plan, key


def _note(op: operation.Operation, cls: ClassPolicy, ctx: Mapping[str, str], key_refs: Iterable[str]) -> None:
    op.classification = cls.name
    op.strict_audit = cls.strict_audit
    op.context = ctx
    for ref in key_refs:
        if ref not in op.key_refs:
            op.key_refs.append(ref)


class _Discard:
    """A sink that keeps nothing (rewrap only authenticates the segments)."""

    def write(self, data: memoryview) -> int:
        return len(data)


# --------------------------------------------------------------------------- random access


class EncryptedFile(io.RawIOBase):
    """A read-only, seekable binary file over a suite-2 envelope that decrypts only the segments a read touches.

    The last segment is verified when the file is opened, so ``size`` (and reads up to it)
    rest on an authenticated length. One decrypted segment is kept for the next read;
    memory is about two segments whatever the file's size. Reads and seeks take a lock,
    so one reader may be shared by threads (each read sees one position).
    """

    def __init__(
        self,
        source: IO[bytes],
        key: segments.StreamKey,
        header: segments.StreamHeader,
        layout: segments.Layout,
        owned: bool,
    ) -> None:
        super().__init__()
        self._source = source
        self._key = key
        self._header = header
        self._layout = layout
        self._owned = owned
        self._lock = threading.Lock()
        self._pos = 0
        self._cached = -1
        self._plain = bytearray(layout.segment_size)
        self._plain_len = 0
        self._stored = bytearray(layout.segment_size + segments.TAG_SIZE)
        self._load(layout.count - 1)

    @property
    def size(self) -> int:
        """The plaintext size in bytes (authenticated by the last segment's tag)."""
        return self._layout.plaintext_size

    @property
    def segment_size(self) -> int:
        return self._layout.segment_size

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        self._checkClosed()
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._checkClosed()
        with self._lock:
            if whence == io.SEEK_SET:
                pos = offset
            elif whence == io.SEEK_CUR:
                pos = self._pos + offset
            elif whence == io.SEEK_END:
                pos = self.size + offset
            else:
                raise ValueError(f"invalid whence ({whence})")
            if pos < 0:
                raise ValueError("negative seek position")
            self._pos = pos
            return pos

    def readinto(self, buffer: Any) -> int:
        """Fill ``buffer`` from the current position (fewer bytes only at the end of the plaintext)."""
        self._checkClosed()
        out = memoryview(buffer).cast("B")
        with self._lock:
            done = 0
            size = self._layout.segment_size
            while done < len(out) and self._pos < self.size:
                index, skip = divmod(self._pos, size)
                self._load(index)
                n = min(self._plain_len - skip, len(out) - done)
                out[done : done + n] = memoryview(self._plain)[skip : skip + n]
                done += n
                self._pos += n
            return done

    def _load(self, index: int) -> None:
        """Make segment ``index`` the cached one (read, verified, decrypted)."""
        if index == self._cached:
            return
        self._cached = -1
        length = self._layout.length(index)
        self._source.seek(self._layout.offset(index))
        view = memoryview(self._stored)[:length]
        got = 0
        while got < length:
            n = self._source.readinto(view[got:])  # type: ignore[attr-defined]
            if not n:
                raise InvalidCiphertext()  # the file shrank since it was opened
            got += n
        plain = memoryview(self._plain)[: length - segments.TAG_SIZE]
        segments.open_into(self._key, self._header, index, index == self._layout.count - 1, view, plain)
        self._plain_len = len(plain)
        self._cached = index

    def close(self) -> None:
        if not self.closed and self._owned:
            self._source.close()
        super().close()
