"""The committed suite-2 (stream) known-answer vectors, checked in both directions.

Sealing a vector's plaintext with its fixed data key and nonce prefix must give the
expected bytes exactly, and parsing + opening the expected bytes must give back every
input. The JSON was written by an independent implementation (vectors/generate_stream.py),
so this pins suite 2's wire format as test_vectors.py pins suite 1's.
"""

from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path
from typing import Any

import pytest

from kmsguard import envelope, segments, stream
from kmsguard.datakey import WrappedKey
from kmsguard.errors import InvalidCiphertext

HERE = Path(__file__).parent / "vectors"
VECTORS = sorted((HERE / "stream").glob("*.json"))


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="ascii"))  # type: ignore[no-any-return]


def header_bytes(v: dict[str, Any], key: segments.StreamKey) -> bytes:
    wrapped = tuple(WrappedKey(w["provider"], w["key_ref"], bytes.fromhex(w["wrapped"])) for w in v["wrapped"])
    return segments.encode(
        envelope.encode_header(v["classification"], v["context"]),
        envelope.encode_wrapped_keys(wrapped),
        key.commitment,
        v["segment_size"],
        bytes.fromhex(v["nonce_prefix"]),
    )


def test_the_required_cases_are_present() -> None:
    by_name = {p.stem: load(p) for p in VECTORS}
    sizes = {name: (len(v["plaintext"]) // 2, v["segment_size"]) for name, v in by_name.items()}
    assert sizes["empty"][0] == 0
    n, s = sizes["one-partial-segment"]
    assert 0 < n < s
    n, s = sizes["one-full-segment"]
    assert n == s
    n, s = sizes["several-segments"]
    assert n > 2 * s and n % s
    n, s = sizes["exact-multiple"]
    assert n > s and n % s == 0
    assert sizes["minimum-segment-size"][1] == segments.MIN_SEGMENT_SIZE


@pytest.mark.parametrize("path", VECTORS, ids=[p.stem for p in VECTORS])
def test_seal_gives_the_expected_bytes(path: Path) -> None:
    v = load(path)
    key = segments.StreamKey(bytes.fromhex(v["dek"]))
    assert key.commitment.hex() == v["commitment"]
    head = header_bytes(v, key)
    out = io.BytesIO()
    size = stream.seal(key, head, segments.parse(head), io.BytesIO(bytes.fromhex(v["plaintext"])), out)
    assert size == len(v["plaintext"]) // 2
    assert out.getvalue().hex() == v["envelope"]


@pytest.mark.parametrize("path", VECTORS, ids=[p.stem for p in VECTORS])
def test_parse_and_open_give_back_the_inputs(path: Path) -> None:
    v = load(path)
    raw = bytes.fromhex(v["envelope"])
    header = segments.parse(raw)
    head = header.header
    assert (raw[2], head.suite) == (1, 2)
    assert head.classification == v["classification"]
    assert dict(head.context) == v["context"]
    assert [(w.provider, w.key_ref, w.wrapped.hex()) for w in head.wrapped_keys] == [
        (w["provider"], w["key_ref"], w["wrapped"]) for w in v["wrapped"]
    ]
    assert (header.commitment.hex(), header.segment_size) == (v["commitment"], v["segment_size"])
    assert header.nonce_prefix.hex() == v["nonce_prefix"]
    assert header.aad.hex() == v["aad"]
    layout = segments.layout(header, len(raw))
    assert layout.count == v["segments"] and layout.plaintext_size == len(v["plaintext"]) // 2
    assert [
        segments.segment_nonce(header.nonce_prefix, i, i == layout.count - 1).hex() for i in range(layout.count)
    ] == v["nonces"]
    key = segments.StreamKey(bytes.fromhex(v["dek"]))
    segments.check_commitment(key, header)
    out = io.BytesIO()
    chunks = stream._Chunks(io.BytesIO(raw[header.size :]))
    stream.open_segments(key, header, chunks, out)
    assert out.getvalue().hex() == v["plaintext"]


@pytest.mark.parametrize("path", VECTORS, ids=[p.stem for p in VECTORS])
def test_a_vector_does_not_open_under_another_key(path: Path) -> None:
    header = segments.parse(bytes.fromhex(load(path)["envelope"]))
    with pytest.raises(InvalidCiphertext):
        segments.check_commitment(segments.StreamKey(bytes(32)), header)


def test_the_stream_keys_are_not_suite_1_keys() -> None:
    """HKDF with suite 2's own info strings: a data key serving both suites gives two AES keys."""
    from kmsguard.datakey import DataKey

    v = load(VECTORS[0])
    dek = bytes.fromhex(v["dek"])
    assert DataKey(dek, ()).commitment != segments.StreamKey(dek).commitment


def test_the_independent_generator_still_writes_the_committed_files() -> None:
    """generate_stream.py (which does not import kmsguard) and the JSON agree byte for byte."""
    spec = importlib.util.spec_from_file_location("generate_stream", HERE / "generate_stream.py")
    assert spec is not None and spec.loader is not None
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    written = {v["name"]: json.loads(json.dumps(v)) for v in generate.vectors()}
    assert written == {p.stem: load(p) for p in VECTORS}
