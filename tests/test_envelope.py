"""envelope.py on its own: round trips, strict parsing, limits and the text form.

Malformed envelopes are built by ``craft`` with a *correct* tag over their own header,
so the only thing wrong with each is the one defect under test: if the parser stopped
checking it, the envelope would open and the test would fail.
"""

from __future__ import annotations

import base64
import os
import struct

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from kmsguard import envelope
from kmsguard.datakey import DataKey, WrappedKey
from kmsguard.errors import InvalidCiphertext, InvalidInput

DEK = bytes(range(32))
LOCAL = WrappedKey("local", "local:general:v1", b"w" * 60)
DK = DataKey(DEK, (LOCAL,))


def u16(n: int) -> bytes:
    return struct.pack(">H", n)


def ctx_section(pairs: list[tuple[bytes, bytes]]) -> bytes:
    return u16(len(pairs)) + b"".join(u16(len(k)) + k + u16(len(v)) + v for k, v in pairs)


def keys_section(entries: list[tuple[bytes, bytes, bytes]]) -> bytes:
    out = bytes([len(entries)])
    for provider, ref, blob in entries:
        out += bytes([len(provider)]) + provider + u16(len(ref)) + ref + u16(len(blob)) + blob
    return out


def craft(
    classification: bytes = b"general",
    context: bytes | None = None,
    keys: bytes | None = None,
    plaintext: bytes = b"data",
    prefix: bytes = b"KG\x01\x01",
) -> bytes:
    """An envelope with arbitrary sections but a valid commitment and tag for its own header."""
    context = ctx_section([]) if context is None else context
    keys = keys_section([(b"local", b"local:general:v1", b"w" * 60)]) if keys is None else keys
    header = prefix + bytes([len(classification)]) + classification + context
    nonce = os.urandom(12)
    body = DK.aead.encrypt(nonce, plaintext, header + DK.commitment + nonce)
    return header + keys + DK.commitment + nonce + body


def opens(raw: bytes) -> bytes:
    return envelope.unseal(DK, envelope.parse(raw))


# --------------------------------------------------------------------------- round trips

contexts = st.dictionaries(
    st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=20),
    st.text(st.characters(exclude_categories=["Cs"]), max_size=40),
    max_size=6,
)
classifications = st.from_regex(r"[a-z0-9_-]{1,32}", fullmatch=True)


@given(plaintext=st.binary(max_size=2048), context=contexts, classification=classifications)
@settings(max_examples=200, deadline=None)
def test_round_trip_of_arbitrary_bytes_and_contexts(
    plaintext: bytes, context: dict[str, str], classification: str
) -> None:
    sealed = envelope.Sealer(DK, classification, context).seal(plaintext)
    env = envelope.parse(sealed)
    assert env.classification == classification
    assert dict(env.context) == context
    assert env.wrapped_keys == (LOCAL,)
    assert envelope.unseal(DK, env) == plaintext
    assert envelope.from_text(envelope.to_text(sealed)) == sealed


def test_context_is_encoded_sorted_by_utf8_bytes_whatever_the_insertion_order() -> None:
    nonce = bytes(12)
    a = envelope.Sealer(DK, "pii", {"\U0001f600": "1", "\uff61": "2", "b": "3", "a": "4"}).seal(b"x", nonce)
    b = envelope.Sealer(DK, "pii", {"a": "4", "b": "3", "\uff61": "2", "\U0001f600": "1"}).seal(b"x", nonce)
    assert a == b
    assert list(envelope.parse(a).context) == ["a", "b", "\uff61", "\U0001f600"]


def test_nonces_are_fresh_per_message() -> None:
    sealer = envelope.Sealer(DK, "general", {})
    nonces = {envelope.parse(sealer.seal(b"same")).nonce for _ in range(200)}
    assert len(nonces) == 200


def test_replace_wrapped_keys_keeps_the_body_and_still_opens() -> None:
    sealed = envelope.Sealer(DK, "general", {"a": "b"}).seal(b"payload")
    other = (WrappedKey("aws-kms", "arn:aws:kms:eu-west-1:1:key/k", b"z" * 100), LOCAL)
    replaced = envelope.replace_wrapped_keys(sealed, other)
    env = envelope.parse(replaced)
    assert env.wrapped_keys == other
    assert replaced[env.body_offset :] == sealed[envelope.parse(sealed).body_offset :]
    assert envelope.unseal(DK, env) == b"payload"


def test_the_commitment_is_checked_before_the_body() -> None:
    """Another key whose body tag would verify is still refused: the commitment binds one DEK."""
    other = DataKey(bytes(32), (LOCAL,))
    env = envelope.parse(envelope.Sealer(DK, "general", {}).seal(b"payload"))
    # Re-encrypt the body under the other key with the *original* commitment in the aad.
    forged_body = other.aead.encrypt(env.nonce, b"forged", env.aad)
    forged = envelope.parse(env.raw[: env.body_offset] + forged_body)
    assert other.aead.decrypt(forged.nonce, forged_body, forged.aad) == b"forged"  # the tag alone would pass
    with pytest.raises(InvalidCiphertext):
        envelope.unseal(other, forged)


# --------------------------------------------------------------------------- encode limits


def test_encode_rejects_bad_classifications() -> None:
    for bad in ["", "A", "gen eral", "é", "x" * 33, "a/b"]:
        with pytest.raises(InvalidInput):
            envelope.Sealer(DK, bad, {}).seal(b"")
    envelope.Sealer(DK, "x" * 32, {}).seal(b"")


def test_encode_rejects_bad_contexts() -> None:
    for bad in [{"": "v"}, {"k": "\ud800"}, {"\udfff": "v"}]:
        with pytest.raises(InvalidInput):
            envelope.Sealer(DK, "general", bad).seal(b"")
    with pytest.raises(InvalidInput):
        envelope.Sealer(DK, "general", {"k": 1}).seal(b"")  # type: ignore[dict-item]


def test_context_section_limit_is_8192_bytes_count_included() -> None:
    fits = {"k": "v" * (8192 - 2 - 2 - 1 - 2)}
    envelope.Sealer(DK, "general", fits).seal(b"")
    with pytest.raises(InvalidInput):
        envelope.Sealer(DK, "general", {"k": "v" * (8192 - 2 - 2 - 1 - 2 + 1)}).seal(b"")
    with pytest.raises(InvalidInput):
        envelope.Sealer(DK, "general", {"k": "v" * 70000}).seal(b"")


def test_wrapped_key_limits_at_encode() -> None:
    ok = WrappedKey("local", "local:general:v1", b"w")
    good = [
        (ok,) * 8,
        (WrappedKey("p" * 32, "r" * 2048, b"w" * 4096),),
    ]
    for wrapped in good:
        envelope.Sealer(DataKey(DEK, wrapped), "general", {}).seal(b"")
    bad = [
        (),
        (ok,) * 9,
        (WrappedKey("", "r", b"w"),),
        (WrappedKey("P", "r", b"w"),),
        (WrappedKey("p" * 33, "r", b"w"),),
        (WrappedKey("p", "", b"w"),),
        (WrappedKey("p", "has space", b"w"),),
        (WrappedKey("p", "r" * 2049, b"w"),),
        (WrappedKey("p", "caf\u00e9", b"w"),),
        (WrappedKey("p", "r", b""),),
        (WrappedKey("p", "r", b"w" * 4097),),
    ]
    for wrapped in bad:
        with pytest.raises(InvalidInput):
            envelope.Sealer(DataKey(DEK, wrapped), "general", {}).seal(b"")


def test_a_nonce_must_be_12_bytes() -> None:
    with pytest.raises(InvalidInput):
        envelope.Sealer(DK, "general", {}).seal(b"", nonce=bytes(11))


# --------------------------------------------------------------------------- strict parsing


def test_craft_builds_a_valid_envelope() -> None:
    """The control for every crafted defect below: without one, craft's output opens."""
    assert opens(craft()) == b"data"
    pairs = [(b"a", b"1"), (b"b", b"")]
    assert dict(envelope.parse(craft(context=ctx_section(pairs))).context) == {"a": "1", "b": ""}


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(craft(prefix=b"KG\x02\x01"), id="version 2"),
        pytest.param(craft(prefix=b"KG\x01\x02"), id="suite 2"),
        pytest.param(craft(prefix=b"kg\x01\x01"), id="magic"),
        pytest.param(craft(classification=b""), id="empty classification"),
        pytest.param(craft(classification=b"General"), id="uppercase classification"),
        pytest.param(craft(classification=b"x" * 33), id="classification too long"),
        pytest.param(craft(context=ctx_section([(b"b", b"1"), (b"a", b"2")])), id="unsorted context"),
        pytest.param(craft(context=ctx_section([(b"a", b"1"), (b"a", b"2")])), id="duplicate context key"),
        pytest.param(craft(context=ctx_section([(b"", b"1")])), id="empty context key"),
        pytest.param(craft(context=ctx_section([(b"k", b"\xff")])), id="invalid utf-8 value"),
        pytest.param(craft(context=ctx_section([(b"\xc0\xaf", b"v")])), id="overlong utf-8 key"),
        pytest.param(craft(context=ctx_section([(b"\xed\xa0\x80", b"v")])), id="surrogate in utf-8"),
        pytest.param(craft(context=ctx_section([(b"k", b"v" * (8192 - 7 + 1))])), id="context section 8193 bytes"),
        pytest.param(craft(context=u16(2) + u16(1) + b"a" + u16(0)), id="context count larger than pairs"),
        pytest.param(craft(keys=keys_section([])), id="zero wrapped keys"),
        pytest.param(craft(keys=keys_section([(b"local", b"r", b"w")] * 9)), id="nine wrapped keys"),
        pytest.param(craft(keys=keys_section([(b"", b"r", b"w")])), id="empty provider"),
        pytest.param(craft(keys=keys_section([(b"Local", b"r", b"w")])), id="uppercase provider"),
        pytest.param(craft(keys=keys_section([(b"p" * 33, b"r", b"w")])), id="provider too long"),
        pytest.param(craft(keys=keys_section([(b"local", b"", b"w")])), id="empty key ref"),
        pytest.param(craft(keys=keys_section([(b"local", b"a b", b"w")])), id="space in key ref"),
        pytest.param(craft(keys=keys_section([(b"local", b"\x7f", b"w")])), id="DEL in key ref"),
        pytest.param(craft(keys=keys_section([(b"local", b"r" * 2049, b"w")])), id="key ref too long"),
        pytest.param(craft(keys=keys_section([(b"local", b"r", b"")])), id="empty wrapped key"),
        pytest.param(craft(keys=keys_section([(b"local", b"r", b"w" * 4097)])), id="wrapped key too long"),
    ],
)
def test_parse_rejects_each_defect(raw: bytes) -> None:
    with pytest.raises(InvalidCiphertext):
        opens(raw)


def test_parse_limits_are_inclusive() -> None:
    exact = craft(context=ctx_section([(b"k", b"v" * (8192 - 7))]))
    assert opens(exact) == b"data"
    limits = craft(
        classification=b"x" * 32,
        keys=keys_section([(b"p" * 32, b"r" * 2048, b"w" * 4096)] + [(b"local", b"r", b"w")] * 7),
    )
    assert opens(limits) == b"data"


def test_every_truncation_and_any_trailing_byte_is_rejected() -> None:
    sealed = envelope.Sealer(DK, "general", {"k": "v"}).seal(b"short")
    for n in range(len(sealed)):
        with pytest.raises(InvalidCiphertext):
            opens(sealed[:n])
    for extra in (b"\x00", b"garbage", sealed):
        with pytest.raises(InvalidCiphertext):
            opens(sealed + extra)


def test_error_messages_carry_no_detail() -> None:
    sealed = envelope.Sealer(DK, "general", {}).seal(b"secret-plaintext")
    errors = []
    for raw in (b"", sealed[:-1], sealed[:4] + b"\xff" + sealed[5:], b"KG" + b"\x00" * 200):
        with pytest.raises(InvalidCiphertext) as info:
            opens(raw)
        errors.append(str(info.value))
    assert set(errors) == {"invalid ciphertext"}
    assert str(InvalidCiphertext("detail that must not leak")) == "invalid ciphertext"


@given(st.binary(max_size=400))
@settings(max_examples=500, deadline=None)
def test_arbitrary_bytes_only_ever_raise_invalid_ciphertext(data: bytes) -> None:
    try:
        env = envelope.parse(data)
    except InvalidCiphertext:
        return
    with pytest.raises(InvalidCiphertext):
        envelope.unseal(DK, env)


VALID = envelope.Sealer(
    DataKey(DEK, (LOCAL, WrappedKey("aws-kms", "arn:aws:kms:us-east-1:1:key/k", b"k" * 40))),
    "pii",
    {"passenger": "42", "z\u00fcrich": "\u2708"},
).seal(b"passport P1234567")
_ENV = envelope.parse(VALID)
_HEADER_LEN = len(_ENV.aad) - 44
_KEYS_END = _ENV.body_offset - 44


@given(
    st.lists(
        st.tuples(st.integers(0, len(VALID)), st.integers(0, 8), st.binary(max_size=8)),
        min_size=1,
        max_size=4,
    )
)
@settings(max_examples=500, deadline=None)
def test_mutated_valid_envelopes_open_unchanged_or_raise_invalid_ciphertext(
    edits: list[tuple[int, int, bytes]],
) -> None:
    """Replace, insert or delete bytes anywhere: the result never opens to other data.

    Only an edit confined to the wrapped-keys section (outside the associated data, by
    design) may still open, and then to the original plaintext.
    """
    data = bytearray(VALID)
    for pos, length, replacement in edits:
        data[pos : pos + length] = replacement
    try:
        plain = opens(bytes(data))
    except InvalidCiphertext:
        return
    assert plain == b"passport P1234567"
    assert data[:_HEADER_LEN] == VALID[:_HEADER_LEN]
    assert data[-(len(VALID) - _KEYS_END) :] == VALID[_KEYS_END:]


# --------------------------------------------------------------------------- text form


def test_text_form_is_kg1_and_unpadded_base64url() -> None:
    token = envelope.to_text(VALID)
    assert token.startswith("kg1:")
    payload = token[4:]
    assert "=" not in payload and "+" not in payload and "/" not in payload
    assert base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)) == VALID


def test_text_form_is_strict() -> None:
    token = envelope.to_text(VALID)  # len(VALID) % 3 == 2, so the token has a partial group
    assert len(VALID) % 3 == 2
    payload = token[4:]
    last = payload[-1]
    # Same bits, different unused padding bits: decodes to the same bytes, but is not canonical.
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    sibling = alphabet[alphabet.index(last) ^ 1]
    bad = [
        token + "=" * (-len(payload) % 4),
        token + "==",
        "KG1:" + payload,
        "kg2:" + payload,
        payload,
        "kg1:" + base64.b64encode(VALID).decode(),
        token.replace("-", "+").replace("_", "/") if ("-" in payload or "_" in payload) else token + "+",
        token[:-1] + sibling,
        token + "AA",  # length % 4 == 1 cannot be base64
        token[:20] + " " + token[20:],
        token + "\n",
        "kg1:",
        "kg1:" + "\u00e9" * 8,
    ]
    for b in bad:
        with pytest.raises(InvalidCiphertext):
            envelope.from_text(b)
    assert envelope.from_text(token) == VALID


def test_coerce_accepts_both_forms_and_refuses_other_types() -> None:
    token = envelope.to_text(VALID)
    assert envelope.coerce(VALID) == VALID
    assert envelope.coerce(bytearray(VALID)) == VALID
    assert envelope.coerce(token) == VALID
    assert envelope.coerce(token.encode() + b"\n") == VALID  # a token read from a file
    for bad in (5, None, ["x"]):
        with pytest.raises(InvalidInput):
            envelope.coerce(bad)  # type: ignore[arg-type]


def test_raw_aes_gcm_matches_the_derived_key() -> None:
    """Guard against double derivation: the body is plain AES-GCM under HKDF(DEK, 'kmsguard v1 enc')."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    enc = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"kmsguard v1 enc").derive(DEK)
    assert AESGCM(enc).decrypt(_ENV.nonce, VALID[_ENV.body_offset :], _ENV.aad) == b"passport P1234567"


def test_a_data_key_refuses_to_seal_past_2_to_the_32_messages() -> None:
    from kmsguard.errors import DataKeyExhausted

    dk = DataKey(DEK, (LOCAL,))
    dk._used = 2**32 - 1  # as if 2^32 - 1 messages had been sealed
    sealer = envelope.Sealer(dk, "general", {})
    sealer.seal(b"the last one")
    with pytest.raises(DataKeyExhausted):
        sealer.seal(b"one too many")


def test_a_data_key_never_shows_its_bytes() -> None:
    text = f"{DK!r} {DK!s}"
    assert "redacted" in text and DEK.hex() not in text and repr(DEK)[2:-1] not in text
    with pytest.raises(InvalidInput):
        DataKey(DEK[:16], (LOCAL,))


@given(
    st.text(max_size=80) | st.text(alphabet="kg1:ABCDEFabcdef0123456789-_=+/ \n", max_size=80).map(lambda t: "kg1:" + t)
)
@settings(max_examples=500, deadline=None)
def test_from_text_accepts_only_canonical_tokens(token: str) -> None:
    try:
        data = envelope.from_text(token)
    except InvalidCiphertext:
        return
    assert envelope.to_text(data) == token


@given(st.binary(max_size=3000))
def test_the_text_form_is_kg1_and_unpadded_base64url(data: bytes) -> None:
    """As RFC 4648's base64url without padding spells it (the standard library's encoder here)."""
    expected = "kg1:" + base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")
    assert envelope.to_text(data) == expected and envelope.to_text_bytes(data) == expected.encode("ascii")
    if data:
        assert envelope.from_text(expected) == data
