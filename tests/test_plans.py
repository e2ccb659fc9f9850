"""Guard's memoized plans must never change an answer: tampering, truncation and context
checks behave the same on a memo hit as on a fresh parse."""

from __future__ import annotations

import pytest

from kmsguard import ContextMismatch, ContextRequired, Guard, InvalidCiphertext, InvalidInput, envelope


def flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 1]) + data[index + 1 :]


def test_tampered_envelopes_fail_after_their_header_is_memoized(guard: Guard) -> None:
    sealed = guard.encrypt(b"payload-bytes", "pii", {"user": "7"})
    assert guard.decrypt(sealed) == b"payload-bytes"  # memoizes the prefix
    body_start = len(sealed) - len(b"payload-bytes") - envelope.TAG_SIZE
    for index in (len(sealed) - 1, body_start, body_start - 1, body_start - envelope.NONCE_SIZE - 1, 5):
        with pytest.raises(InvalidCiphertext):
            guard.decrypt(flip(sealed, index))
    with pytest.raises(InvalidCiphertext):
        guard.decrypt(sealed[: body_start + envelope.TAG_SIZE - 1])
    assert guard.decrypt(sealed) == b"payload-bytes"


def test_context_rules_hold_on_a_memo_hit(guard: Guard) -> None:
    sealed = guard.encrypt(b"4111", "payment", {"purpose": "refund"})
    assert guard.decrypt(sealed, {"purpose": "refund"}) == b"4111"
    with pytest.raises(ContextRequired):
        guard.decrypt(sealed)
    with pytest.raises(ContextMismatch):
        guard.decrypt(sealed, {"purpose": "chargeback"})
    with pytest.raises(ContextRequired):
        guard.encrypt(b"4111", "payment", {})


def test_encrypt_plan_snapshots_the_callers_context(guard: Guard) -> None:
    context = {"user": "7"}
    first = guard.encrypt(b"a", "pii", context)
    context["user"] = "8"
    second = guard.encrypt(b"b", "pii", context)
    assert guard.inspect(first).context == {"user": "7"}
    assert guard.inspect(second).context == {"user": "8"}


@pytest.mark.parametrize("bad", [["user"], {"user": 7}, {"user": ["x"]}])
def test_bad_contexts_are_invalid_input(guard: Guard, bad: object) -> None:
    with pytest.raises(InvalidInput):
        guard.encrypt(b"a", "pii", bad)  # type: ignore[arg-type]


def test_text_tokens_given_as_bytes_still_decrypt(guard: Guard) -> None:
    token = guard.encrypt_text("hello", "general")
    assert guard.decrypt(token.encode("ascii")) == b"hello"
    assert guard.decrypt(bytearray(envelope.from_text(token))) == b"hello"
