"""Sensitive-data detection: a corpus of positives and hard negatives, recall and precision."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from stdnum import luhn

from kmsguard.detect import detect_json, detect_text
from kmsguard.detect.cards import ISSUER_RANGES, brand_of


def with_check_digit(body: str) -> str:
    return body + luhn.calc_check_digit(body)


def card_for(prefix: str, length: int, rng: random.Random) -> str:
    body = prefix + "".join(rng.choice("0123456789") for _ in range(length - len(prefix) - 1))
    return with_check_digit(body)


def spaced(number: str, sep: str) -> str:
    if len(number) == 15:  # Amex prints 4-6-5
        return sep.join([number[:4], number[4:10], number[10:]])
    return sep.join(number[i : i + 4] for i in range(0, len(number), 4))


RNG = random.Random(20)
#: Every brand and length in the issuer table, as the networks print them and as bare digits.
CARDS = sorted(
    {
        card_for(str(low + (high - low) // 2).zfill(width), length, RNG)
        for low, high, width, _brand, lengths in ISSUER_RANGES
        for length in sorted(lengths)
    }
    | {"4111111111111111", "5555555555554444", "378282246310005", "6011111111111117", "3530111333300000"}
    | {"30569309025904", "6200000000000005", "2223003122003222", "4222222222222"}
)
IBANS = [
    "GB82 WEST 1234 5698 7654 32",
    "DE89370400440532013000",
    "FR1420041010050500013M02606",
    "NL91ABNA0417164300",
    "ES9121000418450200051332",
    "SE4550000000058398257466",
    "CH9300762011623852957",
    "IT60X0542811101000000123456",
]
OTHER_POSITIVES = [
    ("email", "anna.eriksson+travel@example.co.uk"),
    ("phone", "+46 70 123 45 67"),
    ("phone", "+14155552671"),
    ("ssn", "536-22-1234"),
    ("passport", "L898902C36UTO7408122F1204159ZE184226B<<<<<10"),
    ("passport", "P<UTOERIKSSON<<ANNA<MARIA<<<<<<<<<<<<<<<<<<<"),
    ("aws_access_key_id", "AKIAIOSFODNN7EXAMPLE"),
    ("aws_secret_access_key", "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"),
]


def luhn_invalid(number: str) -> str:
    last = (int(number[-1]) + 1) % 10
    return number[:-1] + str(last)


HARD_NEGATIVES = [
    *(luhn_invalid(c) for c in CARDS),  # one digit off: the checksum fails
    "1234567812345678",  # Luhn-invalid 16 digits
    "9999999999999995",  # Luhn-valid, but no network issues 9...
    "1000000000000009",  # Luhn-valid order number outside every issuer range
    "Order 7000000000000006 shipped",
    "booking ref QX7K2P / PNR 4HGT9Z / ticket 1572345678901",
    "ORD-2024-000123456789",
    "2024-05-01T10:00:00.123456Z",
    "2024-05-01 10:00:00",
    "1714557600000",  # epoch milliseconds
    "123e4567-e89b-12d3-a456-426614174000",
    "550e8400-e29b-41d4-a716-446655440000",
    "+14155552671",
    "+447911123456",
    "+861391234567890",
    "4111 1111 1111 1111 1",  # a card followed by more digits is not a card
    "sha1 356a192b7913b04c54574d18c28d46e6395428ab",
]


def test_every_card_of_every_brand_is_found_with_and_without_separators() -> None:
    assert len(CARDS) >= 30 and {brand_of(c) for c in CARDS} >= {"visa", "mastercard", "amex", "discover", "jcb"}
    missed = []
    forms = 0
    for number in CARDS:
        for form in (number, spaced(number, " "), spaced(number, "-")):
            forms += 1
            found = [f.kind for f in detect_text(f"paid with {form}.")]
            if found != ["card"]:
                missed.append((brand_of(number), len(number)))
    recall = 1 - len(missed) / forms
    assert recall == 1.0, missed


def test_no_false_card_in_hard_negatives() -> None:
    false_cards = [text for text in HARD_NEGATIVES if any(f.kind == "card" for f in detect_text(text))]
    assert false_cards == []


@pytest.mark.parametrize("value", IBANS)
def test_ibans_of_several_countries(value: str) -> None:
    assert [f.kind for f in detect_text(f"pay to {value} today")] == ["iban"]
    broken = value[:-1] + ("0" if value[-1] != "0" else "1")
    assert [f.kind for f in detect_text(f"pay to {broken} today")] == []


@pytest.mark.parametrize(("kind", "value"), OTHER_POSITIVES)
def test_other_kinds_are_found_and_suggest_their_classification(kind: str, value: str) -> None:
    found = detect_text(value)
    assert [f.kind for f in found] == [kind]
    assert found[0].classification == ("payment" if kind.startswith("aws") else "pii")


def test_negatives_of_other_kinds() -> None:
    for text in (
        "078-05-1120",  # the Woolworth wallet SSN: invalid by stdnum's rules
        "000-12-3456",
        "L898902C37UTO7408122F1204159ZE184226B<<<<<10",  # a wrong check digit
        "commit 356a192b7913b04c54574d18c28d46e6395428ab",
        "secret = 0123456789012345678901234567890123456789",
        "AKIA lowercase akiaiosfodnn7example",
        "user@localhost",
    ):
        assert detect_text(text) == [], text


def test_tokens_are_reported_as_already_protected() -> None:
    token = "kg1:" + "S0cBAQdwYXltZW50AAIADmttc2d1YXJkOmZpZWxk" * 3
    (found,) = detect_text(f"card={token}")
    assert found.kind == "token" and found.protected and found.classification is None
    assert token[4:20] not in found.preview


def test_locations_and_previews() -> None:
    text = "first line\n  card 4111-1111-1111-1111 mail anna@example.com\n"
    card, email = detect_text(text)
    assert (card.location, card.preview) == ("2:8", "************1111")
    assert (email.location, email.preview) == ("2:33", "a***@example.com")
    record = {"pax": [{"passport": "L898902C3", "note": "call +46701234567"}], "n": 4111111111111111}
    assert [(f.kind, f.location) for f in detect_json(record)] == [
        ("passport", "$.pax[0].passport"),
        ("phone", "$.pax[0].note"),
        ("card", "$.n"),
    ]


def test_report_carries_no_value() -> None:
    corpus = [*CARDS, *IBANS, *(v for _, v in OTHER_POSITIVES)]
    for value in corpus:
        for item in detect_text(f"x {value} y"):
            assert value not in str(item.to_dict()) and value not in repr(item)
            digits = "".join(c for c in value if c.isdigit())
            if len(digits) >= 8:
                assert digits not in "".join(c for c in str(item.to_dict()) if c.isdigit())


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="0123456789 -", min_size=13, max_size=24))
def test_property_no_card_without_valid_checksum_and_issuer(text: str) -> None:
    for item in detect_text(text):
        assert item.kind in ("card", "ssn")  # an SSN is digits and dashes too
        if item.kind == "ssn":
            continue
        digits = "".join(c for c in text if c.isdigit())
        assert any(luhn.is_valid(digits[i:j]) for i in range(len(digits)) for j in range(i + 13, len(digits) + 1))
