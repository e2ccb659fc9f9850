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

Every field goes through Guard's public operations (``encrypt_text`` to protect,
``decrypt`` to unprotect), so policy, audit and metrics see each field as one operation;
the bound path is read from the token's public header (kmsguard.envelope) before
anything is decrypted. A string that starts with ``kg1:`` but is no envelope is data to
``protect``, and INVALID_CIPHERTEXT to ``unprotect``.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from kmsguard import blindindex, envelope, masking
from kmsguard.detect import detect_json
from kmsguard.detect.cards import is_card
from kmsguard.detect.finders import spans
from kmsguard.errors import ContextMismatch, InvalidCiphertext, InvalidInput
from kmsguard.jsonpaths import Location, Match, compile_path, format_path, get
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
            index, how = spec.get("index"), spec.get("normalize")
            try:
                if index is not None:
                    blindindex.check_name(index)
                if how is not None and not isinstance(how, str | list | tuple):
                    raise InvalidInput("normalize is a normalizer's name or a list of them")
                blindindex.normalize("", how)  # an unknown normalizer is refused before anything is sealed
            except InvalidInput as exc:
                raise InvalidInput(f"field {path}: {exc.message}") from None
            return cls(classification, index, how)
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
    The copy shares unchanged members with ``record``; neither is ever modified in place.
    """
    if context is not None and not isinstance(context, Mapping):
        raise InvalidInput("context must be a mapping of str to str")
    out = _CopyOnWrite(record)
    base = dict(context) if context else {}
    for location, rule, value, path in _to_seal(record, fields, missing, detect, keep):
        token = guard.encrypt_text(_encode(value, path), rule.classification, {**base, FIELD_KEY: path})
        if rule.index is not None:
            parent = out.container(location[:-1])
            if not isinstance(parent, dict):
                raise InvalidInput(f"field {path}: a blind index needs the field to be an object member")
            term = value if isinstance(value, str) else _canonical(value)
            parent[rule.index] = blindindex.compute(guard, term, rule.classification, rule.index, rule.normalize)
        out.put(location, token)
    return out.result()


def classifications(
    record: Any,
    fields: Mapping[str, FieldSpec] | None = None,
    *,
    missing: str = "error",
    detect: bool = False,
    keep: Iterable[str] = (),
) -> set[str]:
    """The classifications ``protect`` with these arguments would encrypt under (no key is used).

    The service checks the caller's ``encrypt`` scope on each before anything is encrypted.
    Raises what ``protect`` raises for a bad path or a path that matches nothing.
    """
    return {rule.classification for _, rule, _, _ in _to_seal(record, fields, missing, detect, keep)}


def _to_seal(
    record: Any, fields: Mapping[str, FieldSpec] | None, missing: str, detect: bool, keep: Iterable[str]
) -> Iterator[tuple[Location, Field, Any, str]]:
    """What ``protect`` seals: the selected values, less those that already are tokens."""
    if missing not in ("error", "ignore"):
        raise InvalidInput('missing must be "error" or "ignore"')
    field_set = _field_set(fields or {})
    if field_set.disjoint and not detect:
        selected = field_set.select(record, missing)
    else:
        selected = _select(record, field_set, missing, detect, keep)
    for item in selected:
        value = item[2]
        if not (type(value) is str and value.startswith(envelope.TEXT_PREFIX) and _is_token(value)):
            yield item


def _select(
    record: Any, field_set: _FieldSet, missing: str, detect: bool, keep: Iterable[str]
) -> list[tuple[Location, Field, Any, str]]:
    """(location, rule, value, path) of every value to protect: by path, by detection, outermost only."""
    chosen: dict[Location, tuple[Field, Any, str, bool]] = {}  # rule, value, path, detected
    for compiled, path, rule in field_set.rules:
        matches = compiled.find(record)
        if not matches and missing == "error":
            raise InvalidInput(f"field path {path} matches nothing in the record")
        for location, value, concrete in matches:
            chosen[location] = (rule, value, concrete, False)
    if detect:
        kept = {match[0] for path in keep for match in compile_path(path).find(record)}
        for item in detect_json(record):
            if item.classification is None or item.steps is None or _under(item.steps, kept):
                continue
            previous = chosen.get(item.steps)
            if previous is None or (previous[3] and _rank(item.classification) > _rank(previous[0].classification)):
                value = get(record, item.steps)
                chosen[item.steps] = (Field(item.classification), value, format_path(item.steps), True)
    if () in chosen:
        raise InvalidInput("field path $ selects the whole record; select its members")
    return [(location, *chosen[location][:3]) for location in _outermost(chosen)]


def unprotect(
    guard: Guard, record: Any, context: Mapping[str, str] | None = None, *, paths: Sequence[str] | None = None
) -> Any:
    """A copy of ``record`` with every token made by ``protect`` replaced by its value.

    Tokens are found by their ``kg1:`` prefix, or only at ``paths``. A token whose bound
    path differs from where it is found raises CONTEXT_MISMATCH; ``context`` is checked
    against each token's as in ``decrypt``. Tokens not made by ``protect`` are left alone
    when found by prefix, and refused at an explicit path.
    """
    out = _CopyOnWrite(record)
    for location, raw, path in _to_open(record, paths):
        try:
            value = json.loads(guard.decrypt(raw, context).decode("utf-8"))
        except ValueError:
            raise InvalidInput(f"the token at {path} does not hold a JSON value") from None
        out.put(location, value)
    return out.result()


def mask(record: Any, fields: Iterable[str], rules: Mapping[str, masking.MaskRule] | None = None) -> Any:
    """A copy of ``record`` with each selected value irreversibly masked (no key, no key service).

    ``rules`` maps a path of ``fields`` to its rule (``"erase"``, ``"last4"``, ``"email"``,
    a :class:`~kmsguard.masking.Regex` or a callable); without one, the value's detected
    kind picks the rule (a card keeps its last four digits, an email its first letter and
    domain) and anything else is erased. Paths that match nothing are skipped: masking is
    for logs, which must not fail for a missing field.
    """
    rules = rules or {}
    out = _CopyOnWrite(record)
    for path in fields:
        rule = rules.get(path)
        function = masking.rule_function(rule) if rule is not None else _by_kind
        for location, value, _ in compile_path(path).find(record):
            out.put(location, function(value))
    return out.result()


def token_classifications(record: Any, paths: Sequence[str] | None = None) -> set[str]:
    """The classifications of the tokens ``unprotect`` with these arguments would decrypt.

    Read from the tokens' public headers (no key is used): the service checks the caller's
    ``decrypt`` scope on each before anything is decrypted. Raises what ``unprotect``
    raises for a malformed, misplaced or foreign token.
    """
    return {envelope.parse(raw).classification for _, raw, _ in _to_open(record, paths)}


def _to_open(record: Any, paths: Sequence[str] | None) -> Iterator[tuple[Location, bytes, str]]:
    """(location, envelope, path) of each token ``unprotect`` opens, its bound path checked."""
    if paths is None:
        found = list(_tokens(record, ()))
    else:
        found = [
            match
            for path in paths
            for match in compile_path(path).find(record)
            if isinstance(match[1], str) and match[1].startswith(envelope.TEXT_PREFIX)
        ]
    for location, token, path in found:
        raw = envelope.coerce(token)
        bound = _bound_paths.get(raw, path)
        if bound is None:
            if paths is None:
                continue
            raise InvalidInput(f"the token at {path} was not made by protect")
        if bound != path:
            raise ContextMismatch(f"the token at {path} was protected for another field")
        yield location, raw, path


class _CopyOnWrite:
    """The output record: the containers on the way to a changed value are copied, the rest shared."""

    __slots__ = ("_copies", "_last", "_source")

    def __init__(self, source: Any) -> None:
        self._source = source
        self._copies: dict[Location, Any] = {}
        self._last: tuple[Location, Any] = ((), None)  # the container written last: fields come in groups

    def container(self, location: Location) -> Any:
        """The copied container at ``location``; None if a value written earlier replaced it (or one above it)."""
        found = self._copies.get(location)
        if found is None:
            if location:
                parent = self.container(location[:-1])
                if parent is None or not isinstance(parent[location[-1]], dict | list):
                    return None
                found = parent[location[-1]] = _shallow(parent[location[-1]])
            else:
                found = _shallow(self._source)
            self._copies[location] = found
        return found

    def put(self, location: Location, value: Any) -> None:
        if location:
            parent = location[:-1]
            last, container = self._last
            if container is None or last != parent:
                container = self.container(parent)
                if container is None:  # inside a value already replaced: the outer write wins
                    return
                self._last = (parent, container)
            container[location[-1]] = value
        else:
            self._copies[()] = value

    def result(self) -> Any:
        return self.container(())


def _shallow(value: Any) -> Any:
    if isinstance(value, dict):
        return dict(value)
    if isinstance(value, list):
        return list(value)
    return value


class _BoundPaths:
    """The field path a token's header binds, memoized per envelope prefix.

    Tokens sealed for one field under one data key share everything before the nonce
    (header, wrapped keys, commitment), so a record read again and again costs one header
    parse per field and data key, not one per token. The memo remembers, per location,
    the prefix length last seen there, so a lookup is one slice and one probe; a hit means
    the prefix bytes, hence the header, are identical. The decrypt that follows
    authenticates the header either way.
    """

    def __init__(self, capacity: int = 4096) -> None:
        self._capacity = capacity
        self._bound: dict[bytes, str | None] = {}
        self._length: dict[str, int] = {}
        self._lock = threading.Lock()

    def get(self, raw: bytes, path: str) -> str | None:
        with self._lock:
            n = self._length.get(path)
            if n is not None and len(raw) > n + envelope.NONCE_SIZE:
                found = self._bound.get(raw[:n], _ABSENT)
                if found is not _ABSENT:
                    return cast("str | None", found)
        env = envelope.parse(raw)
        bound = env.context.get(FIELD_CONTEXT_KEY)
        prefix = env.body_offset - envelope.NONCE_SIZE
        with self._lock:
            if len(self._bound) >= self._capacity or len(self._length) >= self._capacity:
                self._bound.clear()
                self._length.clear()
            self._length[path] = prefix
            self._bound[raw[:prefix]] = bound
        return bound


_ABSENT = object()
_bound_paths = _BoundPaths()


class _FieldSet:
    """A ``fields`` mapping compiled: its paths and rules, and whether it can be selected directly.

    ``disjoint``: every path names one location (members and indexes only), none inside
    another's, none the root; such a set selects with one lookup per path, in its own order.
    """

    def __init__(self, fields: Mapping[str, FieldSpec]) -> None:
        self.rules = [(compile_path(path), path, Field.of(path, spec)) for path, spec in fields.items()]
        fixed = [compiled.location for compiled, _, _ in self.rules]
        locations = {loc for loc in fixed if loc is not None}
        self.disjoint = (
            len(locations) == len(fixed)
            and () not in locations
            and not any(loc[:i] in locations for loc in locations for i in range(1, len(loc)))
        )

    def select(self, record: Any, missing: str) -> list[tuple[Location, Field, Any, str]]:
        out = []
        for compiled, path, rule in self.rules:
            found = compiled.find(record)
            if found:
                location, value, concrete = found[0]
                out.append((location, rule, value, concrete))
            elif missing == "error":
                raise InvalidInput(f"field path {path} matches nothing in the record")
        return out


_field_sets: dict[Any, _FieldSet] = {}
_field_sets_lock = threading.Lock()


def _field_set(fields: Mapping[str, FieldSpec]) -> _FieldSet:
    """``fields`` compiled; memoized when its specs are plain classification names."""
    try:
        key: Any = tuple(fields.items())
        hash(key)
    except TypeError:
        return _FieldSet(fields)
    with _field_sets_lock:
        found = _field_sets.get(key)
    if found is None:
        found = _FieldSet(fields)
        with _field_sets_lock:
            if len(_field_sets) >= _MAX_FIELD_SETS:
                _field_sets.clear()
            _field_sets[key] = found
    return found


_MAX_FIELD_SETS = 256


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


def _encode(value: Any, path: str) -> str:
    """The value's JSON text: UTF-8 where possible, escaped where it holds a lone surrogate."""
    if type(value) is str:
        text = _encode_str(value)
    else:
        _check_json(value, path)
        text = _ENCODER.encode(value)
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            text = _ASCII_ENCODER.encode(value)
    return text


_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)
_ASCII_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)
_encode_str: Callable[[str], str] = json.encoder.encode_basestring


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


def _tokens(value: Any, here: Location) -> Iterator[Match]:
    if isinstance(value, str):
        if value.startswith(envelope.TEXT_PREFIX):
            yield here, value, format_path(here)
    elif isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, str):
                yield from _tokens(item, (*here, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _tokens(item, (*here, index))


def _under(location: Location, roots: set[Location]) -> bool:
    return any(location[:i] in roots for i in range(len(location) + 1))


def _rank(classification: str) -> int:
    return _STRICTER.get(classification, 0)


def _outermost(chosen: Mapping[Location, tuple[Field, Any, str, bool]]) -> list[Location]:
    """The selected locations, less those inside another selected value of the same classification.

    A value inside another is protected with it; if their classifications differ, the
    inner one's rule would be lost, so that is refused.
    """
    out = []
    for location in chosen:
        for i in range(1, len(location)):
            outer = chosen.get(location[:i])
            if outer is not None:
                if outer[0].classification != chosen[location][0].classification:
                    raise InvalidInput(
                        f"fields {outer[2]} and {chosen[location][2]} overlap under different classifications"
                    )
                break
        else:
            out.append(location)
    return out
