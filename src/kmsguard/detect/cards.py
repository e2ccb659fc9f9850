"""Payment card numbers: the Luhn checksum (python-stdnum) and the issuers' number ranges.

A Luhn check alone passes one random number in ten, so a detector that stopped there
would report order numbers, timestamps in milliseconds and account ids as cards. A
number is reported only if its checksum is valid *and* its leading digits and length
fall in a range a card network issues (the IIN ranges below).
"""

from __future__ import annotations

from stdnum import luhn

#: (first IIN, last IIN, IIN length, brand, allowed lengths), from the networks' published ranges.
ISSUER_RANGES: tuple[tuple[int, int, int, str, frozenset[int]], ...] = (
    (4, 4, 1, "visa", frozenset({13, 16, 19})),
    (51, 55, 2, "mastercard", frozenset({16})),
    (2221, 2720, 4, "mastercard", frozenset({16})),
    (34, 34, 2, "amex", frozenset({15})),
    (37, 37, 2, "amex", frozenset({15})),
    (6011, 6011, 4, "discover", frozenset(range(16, 20))),
    (644, 649, 3, "discover", frozenset(range(16, 20))),
    (65, 65, 2, "discover", frozenset(range(16, 20))),
    (3528, 3589, 4, "jcb", frozenset(range(16, 20))),
    (300, 305, 3, "diners", frozenset(range(14, 20))),
    (36, 36, 2, "diners", frozenset(range(14, 20))),
    (38, 39, 2, "diners", frozenset(range(14, 20))),
    (62, 62, 2, "unionpay", frozenset(range(16, 20))),
    (2200, 2204, 4, "mir", frozenset(range(16, 20))),
    (5018, 5018, 4, "maestro", frozenset(range(13, 20))),
    (5020, 5020, 4, "maestro", frozenset(range(13, 20))),
    (5038, 5038, 4, "maestro", frozenset(range(13, 20))),
    (5893, 5893, 4, "maestro", frozenset(range(13, 20))),
    (6304, 6304, 4, "maestro", frozenset(range(13, 20))),
    (6759, 6759, 4, "maestro", frozenset(range(13, 20))),
    (6761, 6763, 4, "maestro", frozenset(range(13, 20))),
)


#: The first digits any issuer range starts with: a number starting otherwise is no card.
FIRST_DIGITS = frozenset(str(low)[0] for low, *_ in ISSUER_RANGES)
_BY_FIRST_DIGIT = {d: tuple(r for r in ISSUER_RANGES if str(r[0])[0] == d) for d in FIRST_DIGITS}


def brand_of(digits: str) -> str | None:
    """The network whose range and length ``digits`` fit, or None."""
    size = len(digits)
    for low, high, width, brand, lengths in _BY_FIRST_DIGIT.get(digits[:1], ()):
        if size in lengths and low <= int(digits[:width]) <= high:
            return brand
    return None


def is_card(digits: str) -> bool:
    """True for 13-19 digits that are Luhn-valid and in an issuer's range."""
    return 13 <= len(digits) <= 19 and digits.isdigit() and brand_of(digits) is not None and luhn.is_valid(digits)


def grouped_like_a_card(groups: list[int]) -> bool:
    """Separators, when present, split a card as printed: 4-4-4-4(-3), 4-6-5 or 4-6-4.

    Dates, times and phone numbers written with spaces or dashes group differently, so
    this keeps them out even when their digits happen to pass the other checks.
    """
    if len(groups) == 1:
        return True
    if groups in ([4, 6, 5], [4, 6, 4]):
        return True
    return all(g == 4 for g in groups[:-1]) and 1 <= groups[-1] <= 4
