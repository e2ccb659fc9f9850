"""Guard with the local keyring: policy, tamper resistance, rotation, threads, secrecy of errors."""

from __future__ import annotations

import base64
import io
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kmsguard import (
    ContextMismatch,
    ContextRequired,
    Guard,
    InvalidCiphertext,
    InvalidInput,
    KeyDisabled,
    KmsGuardError,
    UnknownClassification,
    envelope,
)
from kmsguard.config import load_settings
from kmsguard.fastpath import OperationEvent
from kmsguard.keyrings.base import KeyRequest
from kmsguard.keyrings.local import KEY_FILE_NAME, LocalKeyring
from kmsguard.policy import ClassPolicy, Policy
from kmsguard.stack import build_keyring

KEYS = {"general": "local:general", "pii": "local:pii", "payment": "local:payment"}


def make_guard(home: Path) -> Guard:
    keyring = LocalKeyring.create(home / KEY_FILE_NAME, ["general", "pii", "payment"])
    return Guard(Policy.defaults(KEYS), keyring)


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guard]:
    """One Guard for the property tests (hypothesis runs many examples per test)."""
    with make_guard(tmp_path_factory.mktemp("shared")) as g:
        yield g


contexts = st.dictionaries(
    st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=12).filter(
        lambda k: not k.startswith("kmsguard:")
    ),
    st.text(st.characters(exclude_categories=["Cs"]), max_size=24),
    max_size=5,
)


@given(plaintext=st.binary(max_size=4096), context=contexts, classification=st.sampled_from(["general", "pii"]))
@settings(max_examples=150, deadline=None)
def test_round_trip_through_guard(
    shared: Guard, plaintext: bytes, context: dict[str, str], classification: str
) -> None:
    sealed = shared.encrypt(plaintext, classification, context)
    assert shared.decrypt(sealed) == plaintext
    assert shared.decrypt(sealed, context) == plaintext
    token = envelope.to_text(sealed)
    assert shared.decrypt(token, context) == plaintext
    info = shared.inspect(token)
    assert (info.classification, info.context, info.body_size) == (classification, context, len(plaintext))


@given(text=st.text(st.characters(exclude_categories=["Cs"]), max_size=200))
@settings(max_examples=50, deadline=None)
def test_text_round_trip(shared: Guard, text: str) -> None:
    token = shared.encrypt_text(text, "pii", {"passenger": "42"})
    assert token.startswith("kg1:")
    assert shared.decrypt_text(token, {"passenger": "42"}) == text


def test_encrypt_accepts_bytes_like_and_refuses_str(guard: Guard) -> None:
    assert guard.decrypt(guard.encrypt(bytearray(b"ab"), "general")) == b"ab"
    assert guard.decrypt(guard.encrypt(memoryview(b"cd"), "general")) == b"cd"
    with pytest.raises(InvalidInput):
        guard.encrypt("text", "general")  # type: ignore[arg-type]
    with pytest.raises(InvalidInput):
        guard.encrypt_text(b"bytes", "general")  # type: ignore[arg-type]


def test_decrypt_text_of_binary_data_is_invalid_input(guard: Guard) -> None:
    token = envelope.to_text(guard.encrypt(b"\xff\xfe", "general"))
    with pytest.raises(InvalidInput) as info:
        guard.decrypt_text(token)
    assert "\\xff" not in str(info.value)


# --------------------------------------------------------------------------- context and policy


def test_payment_requires_purpose_at_encrypt_and_decrypt(guard: Guard) -> None:
    with pytest.raises(ContextRequired):
        guard.encrypt(b"4111111111111111", "payment")
    with pytest.raises(ContextRequired):
        guard.encrypt(b"4111111111111111", "payment", {"booking": "ABC"})
    sealed = guard.encrypt(b"4111111111111111", "payment", {"purpose": "refund", "booking": "ABC"})
    with pytest.raises(ContextRequired):
        guard.decrypt(sealed)
    with pytest.raises(ContextRequired):
        guard.decrypt(sealed, {"booking": "ABC"})
    with pytest.raises(ContextMismatch):
        guard.decrypt(sealed, {"purpose": "chargeback"})
    assert guard.decrypt(sealed, {"purpose": "refund"}) == b"4111111111111111"


def test_every_pair_passed_to_decrypt_must_match(guard: Guard) -> None:
    sealed = guard.encrypt(b"P1234567", "pii", {"passenger": "42", "flight": "LH400"})
    assert guard.decrypt(sealed, {"flight": "LH400"}) == b"P1234567"
    for wrong in ({"passenger": "43"}, {"passenger": "42", "extra": "x"}, {"flight": ""}):
        with pytest.raises(ContextMismatch):
            guard.decrypt(sealed, wrong)


def test_a_non_string_context_value_at_decrypt_is_refused_even_for_a_key_the_header_lacks(guard: Guard) -> None:
    """``None`` once slipped through: a missing header key read as None, which equalled it."""
    sealed = guard.encrypt(b"P1234567", "pii", {"passenger": "42"})
    for bad in ({"flight": None}, {"passenger": "42", "flight": None}, {"passenger": 42}):
        with pytest.raises(InvalidInput):
            guard.decrypt(sealed, bad)  # type: ignore[dict-item]


def test_context_is_bound_by_the_keyring_not_only_the_header(guard: Guard) -> None:
    """A header whose context was swapped (and re-authenticated under the same DEK) still fails:
    the wrapped DEK is bound to the original context."""
    sealed = guard.encrypt(b"P1234567", "pii", {"passenger": "42"})
    env = envelope.parse(sealed)
    request = guard.policy.request(guard.policy.get("pii"), env.context)
    data_key = guard.keyring.unwrap(env.wrapped_keys, request)
    forged = envelope.Sealer(data_key, "pii", {"passenger": "43"}).seal(b"P1234567")
    with pytest.raises(InvalidCiphertext):
        guard.decrypt(forged)
    moved = envelope.Sealer(data_key, "general", {"passenger": "42"}).seal(b"P1234567")
    with pytest.raises(InvalidCiphertext):
        guard.decrypt(moved)


def test_bad_context_and_classification_are_refused_before_any_key_is_made(guard: Guard) -> None:
    for bad in ({"kmsguard:classification": "general"}, {"k": "\ud800"}, {"": "v"}, {"k": 1}, ["k"]):
        with pytest.raises(InvalidInput):
            guard.encrypt(b"x", "general", bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput):
        guard.encrypt(b"x", "general", {"k": "v" * 9000})
    for name in ("unknown", "PII", ""):
        with pytest.raises(UnknownClassification):
            guard.encrypt(b"x", name)


@pytest.mark.parametrize(
    "bad", [{"kmsguard:classification": "general"}, {"k": "\ud800"}, {"k": 1}, {"k": ["unhashable"]}, ["k"]]
)
def test_an_invalid_context_is_refused_alike_with_observers_and_unobserved(keyring: LocalKeyring, bad: object) -> None:
    # With observers, encrypt leaves a dict context to the plan lookup to check: the
    # refusal must still be check_context's own, and no observer may see the context.
    seen: list[OperationEvent] = []

    class Observer:
        def observe(self, op: OperationEvent) -> None:
            seen.append(op)

    policy = Policy.defaults(KEYS)
    plain, observed = Guard(policy, keyring), Guard(policy, keyring, observers=[Observer()])
    messages = []
    for guard in (plain, observed):
        with pytest.raises(InvalidInput) as info:
            guard.encrypt(b"x", "general", bad)  # type: ignore[arg-type]
        messages.append(str(info.value))
    assert messages[0] == messages[1] and seen == []
    observed.encrypt(b"x", "general", {"k": "v"})
    assert [op.context for op in seen] == [{"k": "v"}]


def test_an_envelope_of_an_unconfigured_classification_is_invalid(guard: Guard, tmp_path: Path) -> None:
    keyring = LocalKeyring.create(tmp_path / "other" / KEY_FILE_NAME, ["loyalty"])
    other = Guard(Policy([ClassPolicy(name="loyalty", key="loyalty")]), keyring)
    sealed = other.encrypt(b"points", "loyalty")
    with pytest.raises(InvalidCiphertext):
        guard.decrypt(sealed)


# --------------------------------------------------------------------------- tampering


def test_every_single_bit_flip_is_invalid_ciphertext(guard: Guard) -> None:
    sealed = guard.encrypt(b"abc", "general", {"k": "v"})
    assert len(sealed) < 200
    for i in range(len(sealed)):
        for bit in range(8):
            flipped = bytearray(sealed)
            flipped[i] ^= 1 << bit
            with pytest.raises(InvalidCiphertext):
                guard.decrypt(bytes(flipped))


def test_every_truncation_is_invalid_ciphertext(guard: Guard) -> None:
    sealed = guard.encrypt(b"abc", "pii", {"k": "v"})
    for n in range(len(sealed)):
        with pytest.raises(InvalidCiphertext):
            guard.decrypt(sealed[:n])
    token = envelope.to_text(sealed)
    for n in range(len(token)):
        with pytest.raises(InvalidCiphertext):
            guard.decrypt(token[:n])


def test_trailing_garbage_is_invalid_ciphertext(guard: Guard) -> None:
    sealed = guard.encrypt(b"abc", "general")
    for extra in (b"\x00", b"\xff" * 16, sealed):
        with pytest.raises(InvalidCiphertext):
            guard.decrypt(sealed + extra)
    with pytest.raises(InvalidCiphertext):
        guard.decrypt(envelope.to_text(sealed) + "AAAA")


def test_an_envelope_from_another_keyring_is_invalid(guard: Guard, tmp_path: Path) -> None:
    other = make_guard(tmp_path / "elsewhere")
    sealed = other.encrypt(b"abc", "general")
    with pytest.raises(InvalidCiphertext):
        guard.decrypt(sealed)
    with pytest.raises(InvalidCiphertext):
        guard.rewrap(sealed)


def test_rewrap_refuses_a_forged_body(guard: Guard) -> None:
    sealed = bytearray(guard.encrypt(b"abc", "general"))
    sealed[-1] ^= 1
    with pytest.raises(InvalidCiphertext):
        guard.rewrap(bytes(sealed))


# --------------------------------------------------------------------------- rotation


def test_rotation_keeps_old_envelopes_readable_and_rewrap_moves_them(keyring: LocalKeyring) -> None:
    guard = Guard(Policy.defaults(KEYS), keyring)
    old = guard.encrypt(b"booking 1", "pii", {"passenger": "42"})
    assert guard.inspect(old).keys == [{"provider": "local", "key_ref": "local:pii:v1"}]

    keyring.rotate("pii")
    new = guard.encrypt(b"booking 2", "pii", {"passenger": "42"})
    assert guard.inspect(new).keys[0]["key_ref"] == "local:pii:v2"
    assert guard.decrypt(old) == b"booking 1"

    moved = guard.rewrap(old)
    assert guard.inspect(moved).keys == [{"provider": "local", "key_ref": "local:pii:v2"}]
    body = old[envelope.parse(old).body_offset :]
    assert moved[envelope.parse(moved).body_offset :] == body  # the data was not re-encrypted
    token = guard.rewrap(envelope.to_text(old))
    assert isinstance(token, str) and token.startswith("kg1:")
    assert guard.inspect(token).keys[0]["key_ref"] == "local:pii:v2"
    assert guard.inspect(guard.rewrap_text(envelope.to_text(old))).keys[0]["key_ref"] == "local:pii:v2"

    keyring.set_state("pii", 1, enabled=False)
    with pytest.raises(KeyDisabled) as info:
        guard.decrypt(old)
    assert info.value.code == "KEY_DISABLED"
    assert guard.decrypt(moved) == b"booking 1"
    assert guard.decrypt_text(token) == "booking 1"

    keyring.set_state("pii", 1, enabled=True)
    assert guard.decrypt(old) == b"booking 1"


def test_the_primary_version_cannot_be_disabled(guard: Guard, keyring: LocalKeyring) -> None:
    with pytest.raises(InvalidInput):
        keyring.set_state("general", 1, enabled=False)
    assert guard.decrypt(guard.encrypt(b"x", "general")) == b"x"


def test_key_changes_by_another_process_are_picked_up(keyring: LocalKeyring, home: Path) -> None:
    """``kmsguard keys`` in another process rotates and disables; a running Guard follows:
    it opens what was sealed under the new version, encrypts under it, and refuses the
    disabled one."""
    guard = Guard(Policy.defaults(KEYS), keyring)
    old = guard.encrypt(b"old", "general")
    elsewhere = LocalKeyring(home / KEY_FILE_NAME)  # as another process would hold it
    elsewhere.rotate("general")
    sealed = Guard(Policy.defaults(KEYS), elsewhere).encrypt(b"from elsewhere", "general")
    assert guard.inspect(sealed).keys[0]["key_ref"] == "local:general:v2"
    assert guard.decrypt(sealed) == b"from elsewhere"
    assert guard.inspect(guard.encrypt(b"new", "general")).keys[0]["key_ref"] == "local:general:v2"
    elsewhere.set_state("general", 1, enabled=False)
    with pytest.raises(KeyDisabled):
        guard.decrypt(old)


# --------------------------------------------------------------------------- threads


def test_one_guard_shared_by_threads(guard: Guard, keyring: LocalKeyring) -> None:
    """The Guard of Guard.from_env (cache included) under threads, while the key file rotates."""
    errors: list[BaseException] = []
    results: dict[int, list[bytes]] = {}

    def work(n: int) -> None:
        try:
            sealed = []
            for i in range(60):
                data = f"thread {n} record {i}".encode()
                sealed.append(guard.encrypt(data, "pii", {"thread": str(n)}))
            results[n] = [guard.decrypt(s, {"thread": str(n)}) for s in sealed]
        except BaseException as exc:
            errors.append(exc)

    def rotate() -> None:
        try:
            for _ in range(3):
                keyring.rotate("pii")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(6)] + [threading.Thread(target=rotate)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for n in range(6):
        assert results[n] == [f"thread {n} record {i}".encode() for i in range(60)]
    assert [v.version for v in keyring.versions() if v.name == "pii"] == [1, 2, 3, 4]


# --------------------------------------------------------------------------- secrecy


def _forms(secret: bytes) -> list[str]:
    return [
        secret.hex(),
        base64.b64encode(secret).decode().rstrip("="),
        base64.urlsafe_b64encode(secret).decode().rstrip("="),
        repr(secret)[2:-1],
    ]


def test_no_plaintext_or_data_key_in_errors_or_reprs(guard: Guard) -> None:
    plaintext = b"PLAINTEXT-4111111111111111"
    sealed = guard.encrypt(plaintext, "payment", {"purpose": "refund"})
    env = envelope.parse(sealed)
    data_key = guard.keyring.unwrap(env.wrapped_keys, guard.policy.request(guard.policy.get("payment"), env.context))
    secrets = [plaintext, data_key.plaintext]

    texts = [repr(data_key), str(data_key), repr(env.wrapped_keys), repr(guard.inspect(sealed))]
    failures: list[KmsGuardError] = []
    attempts = [
        lambda: guard.decrypt(sealed),
        lambda: guard.decrypt(sealed, {"purpose": "other"}),
        lambda: guard.decrypt(sealed[:-1], {"purpose": "refund"}),
        lambda: guard.decrypt(sealed + b"x", {"purpose": "refund"}),
        lambda: guard.decrypt_text(envelope.to_text(guard.encrypt(b"\xff" + plaintext, "general"))),
        lambda: guard.encrypt(plaintext, "payment"),
        lambda: guard.encrypt(plaintext, "nope"),
        lambda: guard.encrypt(plaintext.decode(), "general"),  # type: ignore[arg-type]
    ]
    for attempt in attempts:
        with pytest.raises(KmsGuardError) as info:
            attempt()
        failures.append(info.value)
    texts += [f"{e!s} {e!r} {e.to_dict()}" for e in failures]
    for text in texts:
        for secret in secrets:
            for form in _forms(secret):
                assert form not in text
    assert "PLAINTEXT" not in " ".join(texts)


def test_keyring_request_binds_the_classification() -> None:
    assert KeyRequest("pii", "local:pii", {"a": "b"}).bound_context() == {"a": "b", "kmsguard:classification": "pii"}


def test_if_cached_serves_cache_hits_only_and_tokens_like_envelopes(guard: Guard) -> None:
    """encrypt_if_cached / decrypt_if_cached: what an event loop may run inline. None (nothing
    done) until a full-route operation has left the key on its plan; a ``kg1:`` token is
    served as its binary envelope is, and a bad one is left to the full route."""
    context = {"tenant": "t1"}
    assert guard.encrypt_if_cached(b"a", "general", context) is None
    sealed = guard.encrypt(b"a", "general", context)
    guard.encrypt(b"b", "general", context)  # a cache hit on the full route: its kind is known now
    hit = guard.encrypt_if_cached(b"c", "general", context)
    assert hit is not None and guard.decrypt(hit, context) == b"c"
    token = envelope.to_text(sealed)
    assert guard.decrypt_if_cached(token, context) is None
    assert guard.decrypt(token, context) == b"a"
    guard.decrypt(token, context)
    assert guard.decrypt_if_cached(token, context) == b"a"
    assert guard.decrypt_if_cached(sealed, context) == b"a"
    assert guard.decrypt_if_cached(token, {"tenant": "t2"}) is None  # the full route says why
    with pytest.raises(ContextMismatch):
        guard.decrypt(token, {"tenant": "t2"})
    tampered = envelope.to_text(sealed[:-1] + bytes([sealed[-1] ^ 1]))
    for bad in ("kg1:!!", token + "A", tampered):
        assert guard.decrypt_if_cached(bad, context) is None
        with pytest.raises(InvalidCiphertext):
            guard.decrypt(bad, context)


def test_a_body_that_fails_under_a_cached_key_is_refused_audited(tmp_path: Path) -> None:
    seen: list[OperationEvent] = []

    class Collect:
        def observe(self, event: OperationEvent) -> None:
            seen.append(event)

    LocalKeyring.create(tmp_path / KEY_FILE_NAME, ["general", "pii", "payment"])
    settings = load_settings({"KMSGUARD_HOME": str(tmp_path)})
    guard = Guard(settings.policy, build_keyring(settings), observers=[Collect()])  # the data-key cache on
    sealed = guard.encrypt(b"a", "general")
    for _ in range(3):
        guard.decrypt(sealed)  # the key is on its plan: cache hits on the fast route from now on
    seen.clear()
    for data in (sealed[:-1] + bytes([sealed[-1] ^ 1]), envelope.to_text(sealed[:-1] + bytes([sealed[-1] ^ 1]))):
        with pytest.raises(InvalidCiphertext):
            guard.decrypt(data)
    assert [(e.operation, e.outcome, e.error_code) for e in seen] == [("decrypt", "error", "INVALID_CIPHERTEXT")] * 2


def test_classification_of_is_what_inspect_says(guard: Guard, tmp_path: Path) -> None:
    sealed = guard.encrypt(b"x", "pii", {"user": "1"})
    stream_out = io.BytesIO()
    guard.encrypt_stream(io.BytesIO(b"y" * 100), stream_out, "payment", {"purpose": "refund"})
    other = Guard(Policy([ClassPolicy("archive", "local:archive")]), LocalKeyring.create(tmp_path / "k", ["archive"]))
    foreign = other.encrypt(b"z", "archive")  # a classification this guard's policy lacks
    for data in (sealed, envelope.to_text(sealed), stream_out.getvalue(), foreign):
        assert guard.classification_of(data) == guard.inspect(data).classification
        assert guard.classification_of(data) == guard.classification_of(data)  # kept, or parsed again
    for bad in (b"garbage", "kg1:!!", sealed[:40]):
        with pytest.raises(InvalidCiphertext):
            guard.classification_of(bad)
