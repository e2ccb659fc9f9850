"""Streams (envelope suite 2) through Guard: round trips, tampering, random access, rewrap, audit."""

from __future__ import annotations

import io
import random
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kmsguard import Guard, segments
from kmsguard.errors import ContextMismatch, ContextRequired, InvalidCiphertext, InvalidInput
from kmsguard.fastpath import OperationEvent
from kmsguard.keyrings.caching import CachingKeyring
from kmsguard.keyrings.local import KEY_FILE_NAME, LocalKeyring
from kmsguard.policy import Policy

KEYS = {"general": "local:general", "pii": "local:pii", "payment": "local:payment"}
S = segments.MIN_SEGMENT_SIZE


@pytest.fixture(scope="module")
def plain_guard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guard]:
    """A Guard with no cache and no observers (a module's worth of hypothesis examples share it)."""
    keyring = LocalKeyring.create(tmp_path_factory.mktemp("stream") / KEY_FILE_NAME, list(KEYS))
    with Guard(Policy.defaults(KEYS), keyring) as g:
        yield g


def seal(guard: Guard, data: bytes, segment_size: int = S, context: dict[str, str] | None = None) -> bytes:
    out = io.BytesIO()
    assert guard.encrypt_stream(io.BytesIO(data), out, "general", context, segment_size=segment_size) == len(data)
    return out.getvalue()


def open_all(guard: Guard, sealed: bytes, context: dict[str, str] | None = None) -> bytes:
    out = io.BytesIO()
    n = guard.decrypt_stream(io.BytesIO(sealed), out, context)
    assert n == len(out.getvalue())
    return out.getvalue()


def pattern(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


# --------------------------------------------------------------------------- round trips


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    segment_size=st.sampled_from([S, S + 1, 10_000]),
    k=st.integers(0, 4),
    delta=st.sampled_from([-1, 0, 1]),
    cuts=st.lists(st.integers(1, 30_000), max_size=8),
)
def test_round_trips_around_segment_boundaries(
    plain_guard: Guard, segment_size: int, k: int, delta: int, cuts: list[int]
) -> None:
    n = max(0, k * segment_size + delta)
    data = pattern(n, n)
    chunks, pos = [], 0
    for cut in cuts:  # the input as chunks of random sizes, then the rest
        chunks.append(data[pos : pos + cut])
        pos += cut
    chunks.append(data[pos:])
    out = io.BytesIO()
    plain_guard.encrypt_stream(iter(chunks), out, "general", {"doc": "x"}, segment_size=segment_size)
    sealed = out.getvalue()
    info = plain_guard.inspect(sealed)
    assert (info.suite, info.segment_size, info.body_size) == (2, segment_size, n)
    assert info.segments == max(1, -(-n // segment_size))
    assert len(sealed) == segments.parse(sealed).size + n + 16 * info.segments
    assert open_all(plain_guard, sealed, {"doc": "x"}) == data
    assert plain_guard.decrypt(sealed) == data  # decrypt reads suite 2 in memory too
    with plain_guard.open_encrypted(io.BytesIO(sealed)) as reader:
        assert reader.size == n and reader.read() == data


def test_the_source_may_be_a_file_object_without_readinto(plain_guard: Guard) -> None:
    class Reads:
        def __init__(self, data: bytes) -> None:
            self.inner = io.BytesIO(data)

        def read(self, n: int = -1) -> bytes:
            return self.inner.read(min(n, 999))  # short reads, like a pipe

    data = pattern(3 * S + 5)
    out = io.BytesIO()
    plain_guard.encrypt_stream(Reads(data), out, "general")  # type: ignore[arg-type]
    assert open_all(plain_guard, out.getvalue()) == data


@pytest.mark.parametrize("source", [b"bytes", "text", [b"ok", "not bytes"], 42])
def test_a_source_that_is_not_a_stream_is_refused(plain_guard: Guard, source: object) -> None:
    with pytest.raises(InvalidInput):
        plain_guard.encrypt_stream(source, io.BytesIO(), "general")  # type: ignore[arg-type]


@pytest.mark.parametrize("size", [0, S - 1, segments.MAX_SEGMENT_SIZE + 1, 65536.0, True])
def test_segment_size_is_checked(plain_guard: Guard, size: object) -> None:
    with pytest.raises(InvalidInput):
        plain_guard.encrypt_stream(io.BytesIO(b"x"), io.BytesIO(), "general", segment_size=size)  # type: ignore[arg-type]


def test_decrypt_stream_reads_suite_1_too(plain_guard: Guard) -> None:
    sealed = plain_guard.encrypt(b"one message", "general", {"k": "v"})
    assert open_all(plain_guard, sealed, {"k": "v"}) == b"one message"


def test_memory_stays_bounded_by_a_few_segments(plain_guard: Guard) -> None:
    data = pattern(8 << 20)
    sealed = seal(plain_guard, data, 65536)
    src, dst = io.BytesIO(data), _Discard()
    tracemalloc.start()
    try:
        plain_guard.encrypt_stream(src, dst, "general", segment_size=65536)
        plain_guard.decrypt_stream(io.BytesIO(sealed), dst)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Three segments each way plus the header read-ahead: far below the 8 MiB stream.
    assert peak < 1 << 20, peak


class _Discard:
    def write(self, data: memoryview) -> int:
        return len(data)


# --------------------------------------------------------------------------- tampering


@pytest.fixture(scope="module")
def sealed_sample(plain_guard: Guard) -> tuple[bytes, bytes]:
    data = pattern(3 * S + 100, 7)
    return data, seal(plain_guard, data, S, {"doc": "report"})


def rejects(guard: Guard, bad: bytes) -> None:
    with pytest.raises(InvalidCiphertext):
        open_all(guard, bad)
    with pytest.raises(InvalidCiphertext):
        guard.decrypt(bad)


def test_every_truncation_is_invalid_ciphertext(plain_guard: Guard, sealed_sample: tuple[bytes, bytes]) -> None:
    _, sealed = sealed_sample
    header = segments.parse(sealed)
    stored = S + 16
    boundaries = [header.size + i * stored for i in range(4)]
    cuts = set(range(0, header.size + 40)) | {b + d for b in boundaries for d in (-17, -16, -1, 0, 1, 16, 17)}
    cuts |= set(range(header.size, len(sealed), 101))
    for cut in sorted(c for c in cuts if 0 <= c < len(sealed)):
        rejects(plain_guard, sealed[:cut])


def test_extension_is_invalid_ciphertext(plain_guard: Guard, sealed_sample: tuple[bytes, bytes]) -> None:
    _, sealed = sealed_sample
    for extra in (b"\x00", bytes(16), bytes(S + 16), sealed[-116:]):
        rejects(plain_guard, sealed + extra)


def test_dropped_duplicated_or_swapped_segments_are_invalid(
    plain_guard: Guard, sealed_sample: tuple[bytes, bytes]
) -> None:
    _, sealed = sealed_sample
    size = segments.parse(sealed).size
    head, body = sealed[:size], sealed[size:]
    segs = [body[i : i + S + 16] for i in range(0, len(body), S + 16)]
    assert len(segs) == 4
    variants = [
        segs[1:],  # first dropped
        segs[:1] + segs[2:],  # a middle one dropped
        segs[:-1],  # the last dropped: truncation at a boundary
        segs[:2] + segs[1:],  # duplicated
        [segs[1], segs[0], *segs[2:]],  # swapped
        [segs[0], segs[2], segs[1], segs[3]],
    ]
    for variant in variants:
        rejects(plain_guard, head + b"".join(variant))


def test_a_segment_from_another_envelope_with_the_same_data_key_is_invalid(
    keyring: LocalKeyring, tmp_path: Path
) -> None:
    policy = Policy.defaults(KEYS)
    guard = Guard(policy, CachingKeyring(keyring, policy))
    data_a, data_b = pattern(2 * S + 5, 1), pattern(2 * S + 5, 2)
    sealed = []
    for name, data in (("a", data_a), ("b", data_b)):
        path = tmp_path / name
        path.write_bytes(data)
        out = io.BytesIO()
        with path.open("rb") as fh:  # a file: its size lets the cache lend one key to both
            guard.encrypt_stream(fh, out, "general", segment_size=S)
        sealed.append(out.getvalue())
    a, b = (segments.parse(x) for x in sealed)
    assert a.header.wrapped_keys == b.header.wrapped_keys and a.commitment == b.commitment
    assert a.nonce_prefix != b.nonce_prefix
    for index in range(3):
        start = a.size + index * (S + 16)
        end = start + (S + 16 if index < 2 else 5 + 16)
        spliced = sealed[0][:start] + sealed[1][start:end] + sealed[0][end:]
        rejects(guard, spliced)
    # The other envelope's whole tail behind this one's header is rejected too.
    rejects(guard, sealed[0][: a.size] + sealed[1][b.size :])


def test_a_flipped_bit_anywhere_is_invalid_ciphertext(plain_guard: Guard, sealed_sample: tuple[bytes, bytes]) -> None:
    _, sealed = sealed_sample
    header = segments.parse(sealed)
    # Every header byte (the wrapped keys too: outside the associated data, as in suite 1,
    # but a damaged wrapped key does not unwrap), then segment bytes and the last tag.
    positions = set(range(header.size)) | set(range(header.size, len(sealed), 37))
    positions |= {len(sealed) - i for i in range(1, 17)}
    for pos in sorted(positions):
        for bit in (0, 7) if pos < header.size else (pos % 8,):
            flipped = bytearray(sealed)
            flipped[pos] ^= 1 << bit
            rejects(plain_guard, bytes(flipped))


def test_a_reader_releases_nothing_of_a_bad_segment(plain_guard: Guard, sealed_sample: tuple[bytes, bytes]) -> None:
    data, sealed = sealed_sample
    size = segments.parse(sealed).size
    bad = bytearray(sealed)
    bad[size + (S + 16) + 5] ^= 1  # inside the second segment
    out = io.BytesIO()
    with pytest.raises(InvalidCiphertext):
        plain_guard.decrypt_stream(io.BytesIO(bytes(bad)), out)
    assert out.getvalue() == data[:S]  # the first segment verified; nothing of the second
    with plain_guard.open_encrypted(io.BytesIO(bytes(bad))) as reader:
        assert reader.read(S) == data[:S]
        with pytest.raises(InvalidCiphertext):
            reader.read(1)


def test_context_is_checked_as_for_suite_1(plain_guard: Guard) -> None:
    out = io.BytesIO()
    with pytest.raises(ContextRequired):
        plain_guard.encrypt_stream(io.BytesIO(b"x"), out, "payment")
    plain_guard.encrypt_stream(io.BytesIO(b"4111"), out, "payment", {"purpose": "refund"})
    sealed = out.getvalue()
    with pytest.raises(ContextRequired):
        open_all(plain_guard, sealed)
    with pytest.raises(ContextMismatch):
        open_all(plain_guard, sealed, {"purpose": "chargeback"})
    with pytest.raises(ContextMismatch):
        plain_guard.open_encrypted(io.BytesIO(sealed), {"purpose": "chargeback"})
    assert open_all(plain_guard, sealed, {"purpose": "refund"}) == b"4111"


# --------------------------------------------------------------------------- random access


def test_a_thousand_random_reads_match_the_plaintext(plain_guard: Guard, tmp_path: Path) -> None:
    data = pattern(40 * S + 1234, 3)
    path = tmp_path / "big.kg"
    path.write_bytes(seal(plain_guard, data, S))
    rng = random.Random(11)
    with plain_guard.open_encrypted(path) as reader:
        assert (reader.size, reader.segment_size, reader.seekable(), reader.readable()) == (len(data), S, True, True)
        for i in range(1000):
            if i % 10 == 0:  # across a segment end
                offset = rng.randrange(1, 41) * S - rng.randrange(1, 50)
            elif i % 10 == 1:  # past the end
                offset = len(data) + rng.randrange(-100, 100)
            else:
                offset = rng.randrange(0, len(data))
            length = rng.choice([0, 1, 17, S - 1, S, S + 1, 3 * S, rng.randrange(0, 10_000)])
            reader.seek(offset)
            if i % 2:
                got = reader.read(length)
            else:
                buf = bytearray(length)
                got = bytes(buf[: reader.readinto(buf)])
            assert got == data[offset : offset + length], (offset, length)
            assert reader.tell() == offset + len(got)
        assert reader.seek(-10, io.SEEK_END) == len(data) - 10 and reader.read() == data[-10:]
        reader.seek(5)
        assert reader.seek(3, io.SEEK_CUR) == 8 and reader.read(4) == data[8:12]
        with pytest.raises(ValueError):
            reader.seek(-1)
    assert reader.closed
    with pytest.raises(ValueError):
        reader.read(1)


def test_open_encrypted_verifies_the_length_when_it_opens(
    plain_guard: Guard, sealed_sample: tuple[bytes, bytes]
) -> None:
    _, sealed = sealed_sample
    size = segments.parse(sealed).size
    for cut in (len(sealed) - (100 + 16), len(sealed) - 1, size + S + 16):  # at a boundary, inside the tag
        with pytest.raises(InvalidCiphertext):
            plain_guard.open_encrypted(io.BytesIO(sealed[:cut]))


def test_open_encrypted_refuses_suite_1(plain_guard: Guard) -> None:
    with pytest.raises(InvalidCiphertext):
        plain_guard.open_encrypted(io.BytesIO(plain_guard.encrypt(b"x" * 100, "general")))


# --------------------------------------------------------------------------- rewrap and audit


def test_rewrap_keeps_the_segments_byte_for_byte(guard: Guard, keyring: LocalKeyring) -> None:
    data = pattern(5 * S + 3, 5)
    sealed = seal(guard, data, S, {"doc": "scan"})
    keyring.rotate("general")
    new = guard.rewrap(sealed)
    old_h, new_h = segments.parse(sealed), segments.parse(new)
    assert [w.key_ref for w in old_h.header.wrapped_keys] == ["local:general:v1"]
    assert [w.key_ref for w in new_h.header.wrapped_keys] == ["local:general:v2"]
    assert new[: new_h.header.wrapped_start] == sealed[: old_h.header.wrapped_start]
    assert new[new_h.header.wrapped_end :] == sealed[old_h.header.wrapped_end :]  # tail and every segment
    assert open_all(guard, new, {"doc": "scan"}) == data
    bad = bytearray(sealed)
    bad[-1] ^= 1
    with pytest.raises(InvalidCiphertext):  # rewrap never launders a forged stream
        guard.rewrap(bytes(bad))


def test_each_stream_is_one_observed_operation_with_its_size(keyring: LocalKeyring) -> None:
    seen: list[OperationEvent] = []

    class Observer:
        def observe(self, event: OperationEvent) -> None:
            seen.append(event)

    guard = Guard(Policy.defaults(KEYS), keyring, observers=[Observer()])
    data = pattern(3 * S + 1, 9)
    sealed = seal(guard, data, S, {"doc": "x"})
    open_all(guard, sealed, {"doc": "x"})
    with guard.open_encrypted(io.BytesIO(sealed)) as reader:
        reader.read()
    bad = sealed[:-1]
    with pytest.raises(InvalidCiphertext):
        open_all(guard, bad)
    assert [(e.operation, e.outcome, e.size, e.classification) for e in seen] == [
        ("encrypt_stream", "ok", len(data), "general"),
        ("decrypt_stream", "ok", len(data), "general"),
        ("open_encrypted", "ok", len(data), "general"),
        ("decrypt_stream", "error", 0, "general"),
    ]
    assert seen[-1].error_code == "INVALID_CIPHERTEXT"
    assert all(e.key_refs == ("local:general:v1",) for e in seen)
    assert seen[0].context == {"doc": "x"}
    for e in seen:  # names and counts only: no plaintext or key material
        kind = e.kind
        for name in kind.__slots__:
            value = getattr(kind, name)
            assert not isinstance(value, bytes | bytearray | memoryview)


def test_the_census_recognises_streams(plain_guard: Guard, sealed_sample: tuple[bytes, bytes]) -> None:
    from kmsguard.rotation.census import skim

    _, sealed = sealed_sample
    assert skim(sealed) == (b"general", (b"local:general:v1",))
    header = segments.parse(sealed)
    assert skim(sealed[: header.size + 15]) is None  # not even one tag after the header
    assert skim(sealed[: header.size + 16]) is not None
