"""The committed known-answer vectors, checked in both directions.

Sealing the vector's inputs with its fixed data key and nonce must give the expected
bytes exactly, and parsing + unsealing the expected bytes must give back every input.
The JSON was written by an independent implementation (generate.py), so this pins the
wire format: any change to envelope.py that moves a byte fails here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kmsguard import envelope
from kmsguard.datakey import DataKey, WrappedKey
from kmsguard.errors import InvalidCiphertext

VECTORS = sorted((Path(__file__).parent / "vectors").glob("*.json"))


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="ascii"))  # type: ignore[no-any-return]


def data_key(v: dict[str, Any]) -> DataKey:
    wrapped = tuple(WrappedKey(w["provider"], w["key_ref"], bytes.fromhex(w["wrapped"])) for w in v["wrapped"])
    return DataKey(bytes.fromhex(v["dek"]), wrapped)


def test_the_required_cases_are_present() -> None:
    names = {p.stem for p in VECTORS}
    assert {
        "empty-plaintext",
        "empty-context",
        "non-ascii-context",
        "several-wrapped-keys",
        "max-context",
        "one-mib-plaintext",
    } <= names
    by_name = {p.stem: load(p) for p in VECTORS}
    assert by_name["empty-plaintext"]["plaintext"] == ""
    assert by_name["empty-context"]["context"] == {}
    assert any(not k.isascii() for k in by_name["non-ascii-context"]["context"])
    assert len(by_name["several-wrapped-keys"]["wrapped"]) >= 2
    assert len(bytes.fromhex(by_name["one-mib-plaintext"]["plaintext"])) == 1 << 20
    max_ctx = by_name["max-context"]["context"]
    section = 2 + sum(4 + len(k.encode()) + len(v.encode()) for k, v in max_ctx.items())
    assert section == envelope.MAX_CONTEXT_BYTES


@pytest.mark.parametrize("path", VECTORS, ids=[p.stem for p in VECTORS])
def test_seal_gives_the_expected_bytes(path: Path) -> None:
    v = load(path)
    dk = data_key(v)
    assert dk.commitment.hex() == v["commitment"]
    sealed = envelope.Sealer(dk, v["classification"], v["context"]).seal(
        bytes.fromhex(v["plaintext"]), bytes.fromhex(v["nonce"])
    )
    assert sealed.hex() == v["envelope"]


@pytest.mark.parametrize("path", VECTORS, ids=[p.stem for p in VECTORS])
def test_parse_and_unseal_give_back_the_inputs(path: Path) -> None:
    v = load(path)
    raw = bytes.fromhex(v["envelope"])
    env = envelope.parse(raw)
    assert (env.version, env.suite) == (1, 1)
    assert env.classification == v["classification"]
    assert dict(env.context) == v["context"]
    assert [(w.provider, w.key_ref, w.wrapped.hex()) for w in env.wrapped_keys] == [
        (w["provider"], w["key_ref"], w["wrapped"]) for w in v["wrapped"]
    ]
    assert env.commitment.hex() == v["commitment"]
    assert env.nonce.hex() == v["nonce"]
    assert env.aad.hex() == v["aad"]
    assert envelope.unseal(data_key(v), env).hex() == v["plaintext"]
    # The text form round-trips the same bytes.
    assert envelope.from_text(envelope.to_text(raw)) == raw


@pytest.mark.parametrize("path", VECTORS, ids=[p.stem for p in VECTORS])
def test_a_vector_does_not_open_under_another_key(path: Path) -> None:
    v = load(path)
    other = DataKey(bytes(32), data_key(v).wrapped)
    with pytest.raises(InvalidCiphertext):
        envelope.unseal(other, envelope.parse(bytes.fromhex(v["envelope"])))


def test_enc_key_is_the_hkdf_of_the_dek() -> None:
    """The derived body key in the vectors is what actually encrypts (checked with raw AES-GCM)."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    v = load(next(p for p in VECTORS if p.stem == "empty-context"))
    sealed = bytes.fromhex(v["envelope"])
    env = envelope.parse(sealed)
    plain = AESGCM(bytes.fromhex(v["enc_key"])).decrypt(env.nonce, sealed[env.body_offset :], env.aad)
    assert plain.hex() == v["plaintext"]


def test_the_independent_generator_still_writes_the_committed_files() -> None:
    """generate.py (which does not import kmsguard) and the JSON agree byte for byte."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("generate", Path(__file__).parent / "vectors" / "generate.py")
    assert spec is not None and spec.loader is not None
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    written = {v["name"]: json.loads(json.dumps(v)) for v in generate.vectors()}
    assert written == {p.stem: load(p) for p in VECTORS}
