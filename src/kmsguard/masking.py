"""Irreversible masks: what logs, support screens and detection reports show instead of a value.

A mask keeps only what a person needs to recognise a value (the last four digits of a
card, the first letter and domain of an email) and never enough to recover it. Masks
need no key and call no key service. The same functions make detection's previews, so
a value shows the same way in a scan report and in a masked record.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kmsguard.errors import InvalidInput

#: What ``erase`` puts in place of any value.
ERASED = "*****"
_NOT_DIGIT = re.compile(r"\D")


def erase(_value: Any) -> str:
    return ERASED


def last4(value: Any) -> str:
    """A card number (or any digits) with all but its last four digits starred: ``************1111``."""
    digits = _NOT_DIGIT.sub("", value if isinstance(value, str) else str(value))
    if len(digits) < 8:  # too short for four digits to leave the rest unguessable
        return ERASED
    return "*" * (len(digits) - 4) + digits[-4:]


def email(value: Any) -> str:
    """``jane.doe@example.com`` -> ``j***@example.com``; anything else is erased."""
    if not isinstance(value, str) or value.count("@") != 1:
        return ERASED
    local, domain = value.split("@")
    if not local or not domain:
        return ERASED
    return f"{local[0]}***@{domain}"


def keep_head(value: Any, head: int = 4) -> str:
    """The first ``head`` characters, then stars: for identifiers whose prefix names a kind (``AKIA``)."""
    text = value if isinstance(value, str) else str(value)
    if len(text) <= 2 * head:
        return ERASED
    return text[:head] + "*" * (len(text) - head)


def tail(value: Any, keep: int = 2, head: int = 0) -> str:
    """Letters and digits starred but the first ``head`` and last ``keep``, separators kept: ``+*********71``."""
    text = value if isinstance(value, str) else str(value)
    if sum(c.isalnum() for c in text) < 2 * (head + keep):  # too short: what is shown would narrow it too much
        return ERASED
    start = _after_alnums(text, head)
    end = len(text) - _after_alnums(text[::-1], keep)
    return text[:start] + _ALNUM.sub("*", text[start:end]) + text[end:]


def _after_alnums(text: str, count: int) -> int:
    """The index just after the first ``count`` letters or digits of ``text``."""
    seen = 0
    for i, c in enumerate(text):
        if seen == count:
            return i
        seen += c.isalnum()
    return len(text)


_ALNUM = re.compile(r"[^\W_]")


@dataclass(frozen=True)
class Regex:
    """Replace each match of ``pattern`` in a string value with ``replacement`` (``re.sub`` syntax)."""

    pattern: str
    replacement: str = ERASED

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "_compiled", re.compile(self.pattern))
        except re.error:
            raise InvalidInput("invalid masking regex") from None

    def __call__(self, value: Any) -> Any:
        if not isinstance(value, str):
            return ERASED
        compiled: re.Pattern[str] = self._compiled  # type: ignore[attr-defined]
        return compiled.sub(self.replacement, value)


MaskFunction = Callable[[Any], Any]
#: A rule: a name from NAMED_RULES, a Regex, or any callable from the value to its mask.
MaskRule = str | Regex | MaskFunction

NAMED_RULES: dict[str, MaskFunction] = {"erase": erase, "last4": last4, "email": email}

#: How each detected kind is shown (the default rule of ``mask`` and detection's previews).
BY_KIND: dict[str, MaskFunction] = {
    "card": last4,
    "iban": lambda v: tail(v, 4, head=2),
    "email": email,
    "phone": tail,
    "ssn": lambda v: tail(v, 4),
    "passport": erase,
    "aws_access_key_id": keep_head,
    "aws_secret_access_key": erase,
    "token": lambda _v: "kg1:*****",
}


def rule_function(rule: MaskRule) -> MaskFunction:
    """The function a rule names; INVALID_INPUT for an unknown name."""
    if isinstance(rule, str):
        try:
            return NAMED_RULES[rule]
        except KeyError:
            raise InvalidInput(f"unknown masking rule {rule!r}; known: {', '.join(NAMED_RULES)}") from None
    if callable(rule):
        return rule
    raise InvalidInput("a masking rule is a rule name, a Regex or a callable")
