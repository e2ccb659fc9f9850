"""Sensitive-data detection: find card numbers, IBANs, emails, phones, passports, SSNs,
AWS credentials and (as already protected) ``kg1:`` tokens in text and JSON.

A :class:`Finding` says what was found (its kind and the classification that should
protect it), where (a JSON path or ``line:column``) and a masked preview. It never holds
the value itself, so a report can be printed, logged or sent anywhere.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from kmsguard import masking
from kmsguard.detect.cards import is_card
from kmsguard.detect.finders import spans
from kmsguard.jsonpaths import Location, format_path

#: The classification each kind of value should be protected under; None: already protected.
CLASSIFICATION_OF: dict[str, str | None] = {
    "card": "payment",
    "iban": "pii",
    "email": "pii",
    "phone": "pii",
    "passport": "pii",
    "ssn": "pii",
    "aws_access_key_id": "payment",
    "aws_secret_access_key": "payment",
    "token": None,
}
KINDS = tuple(CLASSIFICATION_OF)

# A JSON member's name can say what a value is when its format cannot: a bare passport
# number is just letters and digits, a US SSN may be stored without dashes.
_NAME_HINTS: tuple[tuple[re.Pattern[str], str, re.Pattern[str]], ...] = (
    (re.compile(r"passport", re.I), "passport", re.compile(r"[A-Z0-9]{6,9}")),
    (re.compile(r"(?:^|_)ssn$|social_?security", re.I), "ssn", re.compile(r"\d{9}|\d{3}-\d{2}-\d{4}")),
    (re.compile(r"secret", re.I), "aws_secret_access_key", re.compile(r"[A-Za-z0-9/+]{40}")),
)


@dataclass(frozen=True)
class Finding:
    """One sensitive value: its kind, suggested classification, location and masked preview."""

    kind: str
    classification: str | None
    location: str
    preview: str
    #: For JSON: the concrete location of the string holding the value (protect uses it).
    steps: Location | None = field(default=None, compare=False, repr=False)

    @property
    def protected(self) -> bool:
        return self.kind == "token"

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "classification": self.classification,
            "location": self.location,
            "preview": self.preview,
        }


def finding(kind: str, location: str, value: str, steps: Location | None = None) -> Finding:
    return Finding(kind, CLASSIFICATION_OF[kind], location, masking.BY_KIND[kind](value), steps)


def detect_text(text: str, first_line: int = 1) -> list[Finding]:
    """Findings in ``text``, located by ``line:column`` (1-based; lines counted from ``first_line``)."""
    out = []
    line, line_start = first_line, 0
    for kind, start, end in spans(text):
        newlines = text.count("\n", line_start, start)
        if newlines:
            line += newlines
            line_start = text.rindex("\n", 0, start) + 1
        out.append(finding(kind, f"{line}:{start - line_start + 1}", text[start:end]))
    return out


def detect_json(value: Any, prefix: str = "") -> list[Finding]:
    """Findings in a JSON value, each located by the JSON path of the member holding it.

    Strings are searched; integers of card length are checked as card numbers; a member
    whose name says what it holds (``passport``, ``ssn``) is checked against that kind's
    format. ``prefix`` is put before each location (``line 7 `` for JSON lines).
    """
    return list(_walk(value, (), None, prefix))


def _walk(value: Any, here: Location, name: str | None, prefix: str) -> Iterator[Finding]:
    if isinstance(value, str):
        found = False
        for kind, start, end in spans(value):
            found = True
            yield finding(kind, prefix + format_path(here), value[start:end], here)
        if not found and name is not None:
            hinted = _hinted(name, value)
            if hinted is not None:
                yield finding(hinted, prefix + format_path(here), value, here)
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _walk(item, (*here, key), key if isinstance(key, str) else None, prefix)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _walk(item, (*here, index), name, prefix)
    elif isinstance(value, int) and not isinstance(value, bool) and value > 0 and is_card(str(value)):
        yield finding("card", prefix + format_path(here), str(value), here)


def _hinted(name: str, value: str) -> str | None:
    for name_re, kind, value_re in _NAME_HINTS:
        if name_re.search(name) and value_re.fullmatch(value.strip()):
            return kind
    return None


__all__ = ["CLASSIFICATION_OF", "KINDS", "Finding", "detect_json", "detect_text"]
