"""The detectors: where each kind of sensitive value occurs in a piece of text.

Each detector is a regular expression that finds candidates cheaply over a whole buffer
(a file chunk or one JSON string), followed by a validator that rejects what merely looks
right: card numbers need a valid Luhn checksum and an issuer range (see cards), IBANs and
US social security numbers python-stdnum's validators, passport machine-readable zones
their ICAO check digits. Precision matters as much as recall: a scanner that cries wolf
on every order number is switched off.

Detectors return ``(kind, start, end)`` spans; nothing here keeps or returns a value.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from stdnum import iban
from stdnum.us import ssn

from kmsguard.detect.cards import FIRST_DIGITS, grouped_like_a_card, is_card

Span = tuple[str, int, int]

# Python's regex engine searches fast for a pattern that starts with a literal and slowly
# for one that starts with a character class (it tries every position that fits). So the
# digit- and letter-led patterns run over the text's *shape*, where every digit is "0"
# and every capital "A" (same length, same positions), from a literal such as "0000"; the
# others start with their own literal ("@", "+", "-", "A", "<", "kg1:"), and lookbehinds
# come after the first character.
_SHAPE = str.maketrans("123456789BCDEFGHIJKLMNOPQRSTUVWXYZ", "0" * 9 + "A" * 25)
_CARD = re.compile(r"0000(?<![\w+.\-]0000)(?:[ -]?0){9,15}+(?![\w\-])")
_IBAN = re.compile(r"AA00(?<![A-Za-z0-9]AA00)(?: ?[A0]){11,30}+(?![A-Za-z0-9])")
_EMAIL_DOMAIN = re.compile(r"@((?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24})(?![A-Za-z0-9-])")
_EMAIL_LOCAL = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.!#$%&'*+/=?^_`{|}~-")
_PHONE = re.compile(r"\+(?<![\w+]\+)[1-9](?:[ .-]?\(?\d\)?){6,14}+(?![\w])")
_SSN = re.compile(r"-\d\d-(?<=(?<![\w-])\d{3}-\d\d-)\d{4}(?![\w-])")
_MRZ_LINE2 = re.compile(r"(?<![A-Z0-9<])[A-Z0-9<]{9}\d[A-Z<]{3}\d{7}[MFX<]\d{7}[A-Z0-9<]{14}[0-9<]\d(?![A-Z0-9<])")
_MRZ_LINE1 = re.compile(r"(?<![A-Z0-9<])P[A-Z<][A-Z<]{3}[A-Z]+<<[A-Z<]+(?![A-Z0-9<])")
_AWS_KEY_ID = re.compile(r"A(?<![A-Z0-9]A)(?:KIA|SIA|GPA|IDA|ROA|NPA|NVA|IPA)[A-Z2-7]{16}(?![A-Z0-9])")
_AWS_SECRET = re.compile(
    r"[sS](?<![A-Za-z][sS])(?i:ecret)(?:_?access)?(?:_?key)?[\"']?\s*[:=]\s*[\"']?([A-Za-z0-9/+]{40})(?![A-Za-z0-9/+=])"
)
_TOKEN = re.compile(r"kg1:[A-Za-z0-9_-]{40,}")


def cards(text: str, shaped: str) -> Iterator[Span]:
    for m in _CARD.finditer(shaped):
        start, end = m.span()
        if text[start] not in FIRST_DIGITS:  # no network issues such numbers: skip the checks
            continue
        raw = text[start:end]
        if len(raw) == end - start and raw.isdigit():
            ok = is_card(raw)
        else:
            groups = raw.replace("-", " ").split(" ")
            ok = is_card("".join(groups)) and grouped_like_a_card([len(g) for g in groups])
        if ok:
            yield "card", start, end


def ibans(text: str, shaped: str) -> Iterator[Span]:
    for m in _IBAN.finditer(shaped):
        if iban.is_valid(text[m.start() : m.end()]):
            yield "iban", m.start(), m.end()


def emails(text: str, _shaped: str) -> Iterator[Span]:
    for m in _EMAIL_DOMAIN.finditer(text):
        at = m.start()
        start = at
        while start > 0 and at - start < 64 and text[start - 1] in _EMAIL_LOCAL:
            start -= 1
        while start < at and text[start] == ".":
            start += 1
        if start < at and "*" not in text[start:at]:  # a masked address (j***@example.com) is not one
            yield "email", start, m.end()


def phones(text: str, _shaped: str) -> Iterator[Span]:
    for m in _PHONE.finditer(text):
        digits = sum(c.isdigit() for c in m.group())
        if 8 <= digits <= 15:
            yield "phone", m.start(), m.end()


def ssns(text: str, _shaped: str) -> Iterator[Span]:
    for m in _SSN.finditer(text):
        start = m.start() - 3
        if ssn.is_valid(text[start : m.end()]):
            yield "ssn", start, m.end()


def passports(text: str, _shaped: str) -> Iterator[Span]:
    """Lines of a passport's machine-readable zone (ICAO 9303 TD3): the name line and the data line.

    Both lines of a real MRZ hold "<" fillers, so only lines with a "<" are searched.
    """
    at = text.find("<")
    while at >= 0:
        start = text.rfind("\n", 0, at) + 1
        end = text.find("\n", at)
        end = len(text) if end < 0 else end
        for m in _MRZ_LINE2.finditer(text, start, end):
            if _mrz_line2_valid(m.group()):
                yield "passport", m.start(), m.end()
        for m in _MRZ_LINE1.finditer(text, start, end):
            if m.end() - m.start() == 44:
                yield "passport", m.start(), m.end()
        at = text.find("<", end)


def credentials(text: str, _shaped: str) -> Iterator[Span]:
    for m in _AWS_KEY_ID.finditer(text):
        yield "aws_access_key_id", m.start(), m.end()
    for m in _AWS_SECRET.finditer(text):
        secret = m.group(1)
        if _looks_random(secret):
            yield "aws_secret_access_key", m.start(1), m.end(1)


def tokens(text: str, _shaped: str) -> Iterator[Span]:
    for m in _TOKEN.finditer(text):
        yield "token", m.start(), m.end()


def spans(text: str) -> list[Span]:
    """Every sensitive span in ``text``, ordered by position; overlapping spans keep the first found.

    Each detector runs only if the cheapest test says the text (or its shape) could hold
    its kind at all: four digits in a row for a card, two capitals and two digits for an
    IBAN, an "@", a "+", a "-", a "<", an "A" or "ecret", "kg1:".
    """
    found: list[Span] = []
    shaped = text.translate(_SHAPE)
    if "0000" in shaped:
        found.extend(cards(text, shaped))
    if "AA00" in shaped:
        found.extend(ibans(text, shaped))
    if "@" in text:
        found.extend(emails(text, shaped))
    if "+" in text:
        found.extend(phones(text, shaped))
    if "-" in text:
        found.extend(ssns(text, shaped))
    if "<" in text:
        found.extend(passports(text, shaped))
    if "A" in text or "ecret" in text or "ECRET" in text:
        found.extend(credentials(text, shaped))
    if "kg1:" in text:
        found.extend(tokens(text, shaped))
    if len(found) < 2:
        return found
    found.sort(key=lambda s: (s[1], -s[2]))
    out = [found[0]]
    for span in found[1:]:
        if span[1] >= out[-1][2]:
            out.append(span)
    return out


_MRZ_WEIGHTS = (7, 3, 1)


def _mrz_digit(field: str) -> int:
    total = 0
    for i, c in enumerate(field):
        value = int(c) if c.isdigit() else (ord(c) - 55 if c.isalpha() else 0)
        total += value * _MRZ_WEIGHTS[i % 3]
    return total % 10


def _mrz_line2_valid(line: str) -> bool:
    """ICAO 9303 check digits: document number, birth date, expiry and the composite."""
    if _mrz_digit(line[0:9]) != int(line[9]):
        return False
    if _mrz_digit(line[13:19]) != int(line[19]) or _mrz_digit(line[21:27]) != int(line[27]):
        return False
    composite = line[0:10] + line[13:20] + line[21:43]
    return _mrz_digit(composite) == int(line[43])


def _looks_random(secret: str) -> bool:
    """Mixed case and digits, as generated keys are; words and hex digests are not."""
    return any(c.islower() for c in secret) and any(c.isupper() for c in secret) and any(c.isdigit() for c in secret)
