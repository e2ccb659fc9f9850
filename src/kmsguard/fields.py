"""Field-level protection of JSON records: protect, unprotect and mask selected values.

A record keeps its shape: each selected value (any JSON value: string, number, boolean,
null, object, array) is replaced by a ``kg1:`` token whose plaintext is the value's JSON
text, so ``unprotect`` gives back exactly the value and its type. The rest of the record
stays readable, sortable and indexable.

Each token binds the *concrete* path it was made for (``$.passengers[1].passport``) into
its header context under ``kmsguard:field``. The key is reserved: callers cannot pass it
(kmsguard.plans.check_context refuses it), only this module holds the object that binds
it (:data:`kmsguard.plans.FIELD_KEY`). ``unprotect`` refuses a token found anywhere else
with CONTEXT_MISMATCH, so tokens cannot be swapped between fields; binding a record's
identity (``context={"booking": "ABC123"}``) keeps them from moving between records.
The path is not sent to the key service (kmsguard.policy.FIELD_CONTEXT_KEY), so all the
fields of one classification in a record share one cached data key.

Everything here goes through Guard's public operations (encrypt_text, decrypt_text,
inspect), so policy, audit and metrics see each field as one operation.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kmsguard import blindindex, envelope, masking
from kmsguard.detect import detect_json
from kmsguard.detect.cards import is_card
from kmsguard.detect.finders import spans
from kmsguard.errors import ContextMismatch, InvalidCiphertext, InvalidInput
from kmsguard.jsonpaths import Location, compile_path, format_path, get, put
from kmsguard.plans import FIELD_KEY
from kmsguard.policy import FIELD_CONTEXT_KEY

if TYPE_CHECKING:
    from kmsguard.guard import Guard

#: How a field is protected: a classification name, or ``{"class": ..., "index": ..., "normalize": ...}``.
FieldSpec = str | Mapping[str, Any]
#: When several classifications select nested values, the stricter one must not be lost.
_STRICTER = {"payment": 2, "pii": 1}


@dataclass(frozen=True)
class Field:
    """One protection rule: the classification, and optionally a blind index written beside the field."""

    classification: str
    index: str | None = None
    normalize: blindindex.Normalize = None

    @classmethod
    def of(cls, path: str, spec: FieldSpec) -> Field:
        if isinstance(spec, str):
            return cls(spec)
        if isinstance(spec, Mapping):
            unknown = set(spec) - {"class", "index", "normalize"}
            classification = spec.get("class")
            if unknown or not isinstance(classification, str):
                raise InvalidInput(f'field {path}: expected a classification or {{"class", "index", "normalize"}}')
            index = spec.get("index")
            if index is not None:
                blindindex.check_name(index)
            return cls(classification, index, spec.get("normalize"))
        raise InvalidInput(f"field {path}: expected a classification or a mapping")


def protect(
    guard: Guard,
    record: Any,
    fields: Mapping[str, FieldSpec] | None = None,
    context: Mapping[str, str] | None = None,
    *,
    missing: str = "error",
    detect: bool = False,
    keep: Iterable[str] = (),
) -> Any:
    """A copy of ``record`` with each selected value replaced by a ``kg1:`` token.

    ``fields`` maps a JSONPath to a classification (or a :class:`Field` spec). A path that
    matches nothing raises INVALID_INPUT naming it (``missing="ignore"`` skips it). A value
    that already is a token is left as it is, so protecting twice changes nothing. With
    ``detect=True`` every value detection finds is protected under its suggested
    classification too, except under the paths in ``keep``. Errors name paths, never values.
    """
    if missing not in ("error", "ignore"):
        raise InvalidInput('missing must be "error" or "ignore"')
    if context is not None and not isinstance(context, Mapping):
        raise InvalidInput("context must be a mapping of str to str")
    out = _copy(record)
    chosen: dict[Location, tuple[str, Field]] = {}
    for path, spec in (fields or {}).items():
        rule = Field.of(path, spec)
        matches = compile_path(path).find(out)
        if not matches and missing == "error":
            raise InvalidInput(f"field path {path} matches nothing in the record")
        for location, _ in matches:
            chosen[location] = (path, rule)
    if detect:
        kept = {loc for path in keep for loc, _ in compile_path(path).find(out)}
        for item in detect_json(out):
            if item.classification is None or item.steps is None or _under(item.steps, kept):
                continue
            previous = chosen.get(item.steps)
            if previous is None or (
                previous[0] == "detected" and _rank(item.classification) > _rank(previous[1].classification)
            ):
                chosen[item.steps] = ("detected", Field(item.classification))
    base = dict(context) if context else {}
    for location in _outermost(chosen):
        _, rule = chosen[location]
        path = format_path(location)
        if not location:
            raise InvalidInput("field path $ selects the whole record; select its members")
        value = get(out, location)
        if isinstance(value, str) and _is_token(value):
            continue
        plaintext = _encode(value, path)
        token = guard.encrypt_text(plaintext, rule.classification, {**base, FIELD_KEY: path})
        if rule.index is not None:
            parent = get(out, location[:-1])
            if not isinstance(parent, dict):
                raise InvalidInput(f"field {path}: a blind index needs the field to be an object member")
            term = value if isinstance(value, str) else _canonical(value)
            parent[rule.index] = blindindex.compute(guard, term, rule.classification, rule.index, rule.normalize)
        put(out, location, token)
    return out


def unprotect(
    guard: Guard, record: Any, context: Mapping[str, str] | None = None, *, paths: Sequence[str] | None = None
) -> Any:
    """A copy of ``record`` with every token made by ``protect`` replaced by its value.

    Tokens are found by their ``kg1:`` prefix, or only at ``paths``. A token whose bound
    path differs from where it is found raises CONTEXT_MISMATCH; ``context`` is checked
    against each token's as in ``decrypt``. Tokens not made by ``protect`` are left alone
    when found by prefix, and refused at an explicit path.
    """
    out = _copy(record)
    if paths is None:
        found = list(_tokens(out, ()))
    else:
        found = [
            loc
            for path in paths
            for loc, value in compile_path(path).find(out)
            if isinstance(value, str) and value.startswith(envelope.TEXT_PREFIX)
        ]
    for location in found:
        token = get(out, location)
        path = format_path(location)
        bound = guard.inspect(token).context.get(FIELD_CONTEXT_KEY)
        if bound is None:
            if paths is None:
                continue
            raise InvalidInput(f"the token at {path} was not made by protect")
        if bound != path:
            raise ContextMismatch(f"the token at {path} was protected for another field")
        text = guard.decrypt_text(token, context)
        try:
            value = json.loads(text)
        except ValueError:
            raise InvalidInput(f"the token at {path} does not hold a JSON value") from None
        if location:
            put(out, location, value)
        else:
            out = value
    return out


def mask(record: Any, fields: Iterable[str], rules: Mapping[str, masking.MaskRule] | None = None) -> Any:
    """A copy of ``record`` with each selected value irreversibly masked (no key, no key service).

    ``rules`` maps a path of ``fields`` to its rule (``"erase"``, ``"last4"``, ``"email"``,
    a :class:`~kmsguard.masking.Regex` or a callable); without one, the value's detected
    kind picks the rule (a card keeps its last four digits, an email its first letter and
    domain) and anything else is erased. Paths that match nothing are skipped: masking is
    for logs, which must not fail for a missing field.
    """
    rules = rules or {}
    out = _copy(record)
    for path in fields:
        rule = rules.get(path)
        function = masking.rule_function(rule) if rule is not None else None
        for location, value in compile_path(path).find(out):
            masked = function(value) if function is not None else _by_kind(value)
            if location:
                put(out, location, masked)
            else:
                out = masked
    return out


def _by_kind(value: Any) -> Any:
    """The default mask: the rule of the kind the whole value is detected as, else erase."""
    if isinstance(value, str):
        found = spans(value)
        if len(found) == 1:
            kind, start, end = found[0]
            if start == 0 and end == len(value):
                return masking.BY_KIND[kind](value)
    elif isinstance(value, int) and not isinstance(value, bool) and value > 0 and is_card(str(value)):
        return masking.last4(value)
    return masking.ERASED


def _copy(value: Any) -> Any:
    """The record's containers copied (the caller's record is never changed); leaves shared."""
    if type(value) is dict:
        return {k: _copy(v) for k, v in value.items()}
    if type(value) is list:
        return [_copy(v) for v in value]
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def _encode(value: Any, path: str) -> str:
    _check_json(value, path)
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def _canonical(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=True)


def _check_json(value: Any, path: str) -> None:
    """INVALID_INPUT naming ``path`` unless ``value`` round-trips through JSON unchanged in type."""
    if value is None or isinstance(value, str | bool | int):
        return
    if isinstance(value, float):
        if math.isfinite(value):
            return
    elif isinstance(value, list):
        for item in value:
            _check_json(item, path)
        return
    elif isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                break
            _check_json(item, path)
        else:
            return
    raise InvalidInput(f"field {path} holds a value that is not JSON")


def _is_token(value: str) -> bool:
    if not value.startswith(envelope.TEXT_PREFIX):
        return False
    try:
        envelope.parse(envelope.coerce(value))
    except InvalidCiphertext:  # text that merely starts like a token is data, to be protected
        return False
    return True


def _tokens(value: Any, here: Location) -> Iterable[Location]:
    if isinstance(value, str):
        if value.startswith(envelope.TEXT_PREFIX):
            yield here
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _tokens(item, (*here, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _tokens(item, (*here, index))


def _under(location: Location, roots: set[Location]) -> bool:
    return any(location[:i] in roots for i in range(len(location) + 1))


def _rank(classification: str) -> int:
    return _STRICTER.get(classification, 0)


def _outermost(chosen: Mapping[Location, tuple[str, Field]]) -> list[Location]:
    """The selected locations, less those inside another selected value of the same classification.

    A value inside another is protected with it; if their classifications differ, the
    inner one's rule would be lost, so that is refused.
    """
    out = []
    for location in sorted(chosen, key=len):
        outer = next((location[:i] for i in range(len(location)) if location[:i] in chosen), None)
        if outer is None:
            out.append(location)
            continue
        if chosen[outer][1].classification != chosen[location][1].classification:
            raise InvalidInput(
                f"fields {format_path(outer)} and {format_path(location)} overlap under different classifications"
            )
    return out
