"""Field-level protect / unprotect / mask over JSON records (local keyring)."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from kmsguard import Guard, fields, plans
from kmsguard.errors import ContextMismatch, InvalidCiphertext, InvalidInput
from kmsguard.jsonpaths import Location, compile_path, format_path
from kmsguard.keyrings.local import LocalKeyring
from kmsguard.masking import ERASED, Regex
from kmsguard.policy import Policy

BOOKING: dict[str, Any] = {
    "booking": "QX7K2P",
    "fare": {"amount": 412.5, "currency": "EUR"},
    "seat": "14C",
    "card": {"number": "4111 1111 1111 1111", "expiry": "12/29", "holder": "Anna Eriksson"},
    "passengers": [
        {"name": "Anna Eriksson", "passport": "L898902C3", "email": "anna@example.com", "age": 41, "vip": True},
        {"name": "Bo Eriksson", "passport": "X1234567", "email": "bo@example.org", "age": 9, "vip": False},
    ],
    "notes": None,
}
FIELDS = {
    "$.passengers[*].passport": "pii",
    "$..email": "pii",
    "$.card.number": "payment",
    "$.card.holder": "payment",
    "$.passengers[*].age": "pii",
    "$.passengers[*].vip": "pii",
    "$.notes": "general",
    "$.fare": "general",
}
CONTEXT = {"booking": "QX7K2P", "purpose": "checkout"}
SLOW = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def typed(value: Any) -> Any:
    """A value with every leaf tagged by its type, so 1, 1.0 and True never compare equal."""
    if isinstance(value, dict):
        return {k: typed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [typed(v) for v in value]
    return (type(value).__name__, value)


def test_booking_round_trip_keeps_types_and_shape(guard: Guard) -> None:
    original = copy.deepcopy(BOOKING)
    protected = guard.protect(BOOKING, FIELDS, CONTEXT)
    assert original == BOOKING  # the caller's record is not changed
    assert protected["seat"] == "14C" and protected["booking"] == "QX7K2P"
    for token in (protected["card"]["number"], protected["passengers"][1]["age"], protected["fare"]):
        assert isinstance(token, str) and token.startswith("kg1:")
    assert typed(guard.unprotect(protected, CONTEXT)) == typed(BOOKING)


def test_token_binds_its_concrete_path_but_not_at_the_key_service(guard: Guard) -> None:
    protected = guard.protect(BOOKING, FIELDS, CONTEXT)
    info = guard.inspect(protected["passengers"][1]["passport"])
    assert info.context == {**CONTEXT, "kmsguard:field": "$.passengers[1].passport"}
    # Fields of one classification in one record share a data key (one wrapped key).
    pii = [guard.inspect(protected["passengers"][i][k]).keys for i in (0, 1) for k in ("passport", "email")]
    assert all(keys == pii[0] for keys in pii)


def test_token_moved_to_another_field_or_record_is_refused(guard: Guard) -> None:
    protected = guard.protect(BOOKING, FIELDS, CONTEXT)
    swapped = copy.deepcopy(protected)
    a, b = swapped["passengers"]
    a["passport"], b["passport"] = b["passport"], a["passport"]
    with pytest.raises(ContextMismatch) as err:
        guard.unprotect(swapped, CONTEXT)
    assert err.value.code == "CONTEXT_MISMATCH" and "$.passengers[0].passport" in err.value.message
    other = guard.protect(BOOKING, FIELDS, {"booking": "ZZ9ZZ9", "purpose": "checkout"})
    other["card"]["number"] = protected["card"]["number"]
    with pytest.raises(ContextMismatch):
        guard.unprotect(other, {"booking": "ZZ9ZZ9", "purpose": "checkout"})


@pytest.mark.parametrize("observed", [True, False])
def test_callers_cannot_bind_the_reserved_field_key(guard: Guard, keyring: LocalKeyring, observed: bool) -> None:
    g = guard if observed else Guard(guard.policy, guard.keyring)
    g.protect({"a": "x"}, {"$.a": "pii"})  # plans and lanes for the field context are now warm
    for context in ({"kmsguard:field": "$.a"}, {"kmsguard:field": "$.a", "x": "y"}):
        with pytest.raises(InvalidInput, match="reserved"):
            g.encrypt(b"forged", "pii", context)
        with pytest.raises(InvalidInput, match="reserved"):
            g.encrypt(b"forged", "pii", context)
    plain = "kmsguard:field"
    assert plain not in {plans.FIELD_KEY: 1} and plans.FIELD_KEY not in {plain: 1}


def test_protect_is_idempotent_and_leaves_tokens_alone(guard: Guard) -> None:
    once = guard.protect(BOOKING, FIELDS, CONTEXT)
    assert guard.protect(once, FIELDS, CONTEXT) == once
    # Text that merely starts like a token is data: it is protected, and comes back as it was.
    record = {"note": "kg1:not-a-token"}
    assert guard.unprotect(guard.protect(record, {"$.note": "general"})) == record


def test_text_that_is_not_utf8_encodable_round_trips(guard: Guard) -> None:
    record = {"a": "lone \ud800 surrogate", "b": ["Straße", {"c": "\udfff"}], "d": "東京"}
    protected = guard.protect(record, {"$.a": "pii", "$.b": "pii", "$.d": "pii"})
    assert guard.unprotect(protected) == record


def test_unprotect_refuses_text_that_only_looks_like_a_token(guard: Guard) -> None:
    with pytest.raises(InvalidCiphertext):
        guard.unprotect({"a": "kg1:garbled"})
    protected = guard.protect({"a": "secret value"}, {"$.a": "pii"})
    tampered = {"a": protected["a"][:-6] + ("AAAAAA" if not protected["a"].endswith("AAAAAA") else "BBBBBB")}
    with pytest.raises(InvalidCiphertext):
        guard.unprotect(tampered)


def test_missing_path_names_the_path_and_can_be_ignored(guard: Guard) -> None:
    with pytest.raises(InvalidInput) as err:
        guard.protect(BOOKING, {"$.loyalty.number": "pii"})
    assert "$.loyalty.number" in err.value.message
    assert guard.protect(BOOKING, {"$.loyalty.number": "pii"}, missing="ignore") == BOOKING


@pytest.mark.parametrize("bad", [float("nan"), {1: "int key"}, (1, 2), b"raw bytes", {"x": object()}])
def test_non_json_value_names_the_path_never_the_value(guard: Guard, bad: Any) -> None:
    with pytest.raises(InvalidInput) as err:
        guard.protect({"secret": bad, "ok": 1}, {"$.secret": "pii"})
    assert "$.secret" in err.value.message
    assert repr(bad) not in err.value.message and "int key" not in err.value.message


def test_invalid_inputs_are_refused_with_invalid_input(guard: Guard) -> None:
    for call in (
        lambda: guard.protect(BOOKING, {"$.[": "pii"}),
        lambda: guard.protect(BOOKING, {"$": "pii"}),
        lambda: guard.protect(BOOKING, {"$.seat": {"klass": "pii"}}),
        lambda: guard.protect(BOOKING, {"$.seat": "pii"}, missing="maybe"),
        lambda: guard.protect(BOOKING, {"$.seat": "pii"}, ["not", "a", "mapping"]),  # type: ignore[arg-type]
    ):
        with pytest.raises(InvalidInput):
            call()


def test_nested_selections_are_protected_once_or_refused_across_classes(guard: Guard) -> None:
    same = guard.protect(BOOKING, {"$.card": "payment", "$.card.number": "payment"}, CONTEXT)
    assert isinstance(same["card"], str)
    assert guard.unprotect(same, CONTEXT) == BOOKING
    with pytest.raises(InvalidInput, match=r"\$\.card and \$\.card\.number overlap"):
        guard.protect(BOOKING, {"$.card": "pii", "$.card.number": "payment"}, CONTEXT)


def test_unprotect_at_given_paths_only(guard: Guard) -> None:
    protected = guard.protect(BOOKING, FIELDS, CONTEXT)
    partly = guard.unprotect(protected, CONTEXT, paths=["$.card.number"])
    assert partly["card"]["number"] == "4111 1111 1111 1111"
    assert partly["passengers"][0]["email"].startswith("kg1:")
    # A token that protect did not make: left alone when found by prefix, refused at a given path.
    plain = {"t": guard.encrypt_text("hello", "general")}
    assert guard.unprotect(plain) == plain
    with pytest.raises(InvalidInput, match="not made by protect"):
        guard.unprotect(plain, paths=["$.t"])


def test_detect_protects_what_it_finds_except_kept_paths(guard: Guard) -> None:
    record = {
        "id": "QX7K2P",
        "contact": {"email": "anna@example.com", "phone": "+46701234567"},
        "card": 4111111111111111,
        "support": {"email": "help@airline.example"},
        "passport": "L898902C3",
    }
    out = guard.protect(record, detect=True, keep=["$.support"], context={"purpose": "checkout"})
    assert out["id"] == "QX7K2P" and out["support"] == record["support"]
    for token in (out["contact"]["email"], out["contact"]["phone"], out["passport"]):
        assert guard.inspect(token).classification == "pii"
    assert guard.inspect(out["card"]).classification == "payment"
    assert guard.unprotect(out, {"purpose": "checkout"}) == record


def test_protect_writes_a_blind_index_beside_the_field(guard: Guard) -> None:
    spec = {"$.passengers[*].passport": {"class": "pii", "index": "passport_idx", "normalize": "casefold"}}
    out = guard.protect(BOOKING, spec)
    first = out["passengers"][0]
    assert first["passport_idx"] == guard.blind_index("l898902c3", "pii", "passport_idx", normalize="casefold")
    with pytest.raises(InvalidInput):
        guard.protect(BOOKING, {"$.passengers[*].passport": {"class": "pii", "index": "bad name"}})


def _mask_upper(value: Any) -> Any:
    return str(value).upper()


@pytest.mark.parametrize(
    ("path", "rule", "expected"),
    [
        ("$.card.number", None, "************1111"),
        ("$.passengers[0].email", None, "a***@example.com"),
        ("$.passengers[0].email", "email", "a***@example.com"),
        ("$.card.number", "last4", "************1111"),
        ("$.seat", None, ERASED),
        ("$.seat", "erase", ERASED),
        ("$.card.expiry", Regex(r"\d{2}$", "**"), "12/**"),
        ("$.seat", _mask_upper, "14C"),
        ("$.booking", lambda v: v[:2] + "****", "QX****"),
    ],
)
def test_mask_rules(path: str, rule: Any, expected: str) -> None:
    out = fields.mask(BOOKING, [path], {path: rule} if rule is not None else None)
    assert compile_path(path).find(out)[0][1] == expected


def test_mask_of_nested_paths_keeps_the_outer_mask() -> None:
    original = copy.deepcopy(BOOKING)
    for paths in (["$.card", "$.card.number"], ["$.card.number", "$.card"]):
        out = fields.mask(BOOKING, paths)
        assert out["card"] == ERASED and out["seat"] == "14C"
    assert original == BOOKING


def test_mask_uses_no_key_and_skips_missing_paths() -> None:
    class NoKeys:
        def _used(self, *args: Any) -> Any:
            raise AssertionError("mask used the keyring")

        generate = wrap = unwrap = rewrap = _used

    g = Guard(Policy.defaults({c: c for c in ("general", "pii", "payment")}), NoKeys())  # type: ignore[arg-type]
    out = g.mask(BOOKING, ["$..email", "$.no.such.field"])
    assert [p["email"] for p in out["passengers"]] == ["a***@example.com", "b***@example.org"]
    with pytest.raises(InvalidInput):
        fields.mask(BOOKING, ["$.seat"], {"$.seat": "shred"})
    with pytest.raises(InvalidInput):
        Regex("(")


# ---------------------------------------------------------------------- properties

JSON_LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(exclude_categories=[]), max_size=20)  # lone surrogates too
)
JSON_VALUES = st.recursive(
    JSON_LEAVES,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
RECORDS = st.dictionaries(st.text(max_size=8), JSON_VALUES, min_size=1, max_size=6)


def locations(value: Any, here: Location = ()) -> list[Location]:
    """Every location in a record (not the root), outermost first."""
    out: list[Location] = []
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        out.append((*here, key))
        out.extend(locations(item, (*here, key)))
    return out


def disjoint(chosen: list[Location]) -> list[Location]:
    kept: list[Location] = []
    for loc in sorted(set(chosen), key=len):
        if not any(loc[: len(k)] == k for k in kept):
            kept.append(loc)
    return kept


@st.composite
def records_and_paths(draw: st.DrawFn) -> tuple[dict[str, Any], dict[str, str]]:
    record = draw(RECORDS)
    every = locations(record)
    chosen = draw(st.lists(st.sampled_from(every), min_size=1, max_size=6)) if every else []
    classes = st.sampled_from(["general", "pii"])
    return record, {format_path(loc): draw(classes) for loc in disjoint(chosen)}


@SLOW
@given(data=records_and_paths())
def test_property_round_trip_preserves_types(guard: Guard, data: tuple[dict[str, Any], dict[str, str]]) -> None:
    record, chosen = data
    protected = guard.protect(record, chosen, {"record": "r1"})
    assert json.loads(json.dumps(protected)) == protected  # still plain JSON
    assert typed(guard.unprotect(protected, {"record": "r1"})) == typed(record)


@SLOW
@given(data=records_and_paths())
def test_property_protect_is_idempotent(guard: Guard, data: tuple[dict[str, Any], dict[str, str]]) -> None:
    record, chosen = data
    once = guard.protect(record, chosen)
    assert guard.protect(once, chosen) == once


@SLOW
@given(data=records_and_paths(), pick=st.randoms(use_true_random=False))
def test_property_moved_token_fails(guard: Guard, data: tuple[dict[str, Any], dict[str, str]], pick: Any) -> None:
    record, chosen = data
    protected = guard.protect(record, chosen)
    tokens = [loc for path in chosen for loc, v, _ in compile_path(path).find(protected) if isinstance(v, str)]
    every = [loc for loc in locations(protected) if not any(loc[: len(t)] == t for t in tokens)]
    assume(tokens and every)
    source, target = pick.choice(tokens), pick.choice(every)
    moved = copy.deepcopy(protected)
    parent = moved
    for step in target[:-1]:
        parent = parent[step]
    parent[target[-1]] = compile_path(format_path(source)).find(protected)[0][1]
    with pytest.raises(ContextMismatch):
        fields.unprotect(guard, moved)


@settings(max_examples=200, deadline=None)
@given(record=RECORDS)
def test_property_format_path_selects_exactly_its_location(record: dict[str, Any]) -> None:
    for loc in locations(record):
        path = format_path(loc)
        assert [(found, text) for found, _, text in compile_path(path).find(record)] == [(loc, path)]


def test_compiled_paths_are_cached() -> None:
    assert compile_path("$.a.b[*].c") is compile_path("$.a.b[*].c")
    assert compile_path("$..email") is compile_path("$..email")


@pytest.mark.parametrize("path", ["$.a.`sorted`", "$.a[?(@.b & @.c)]"])
def test_a_path_jsonpath_ng_cannot_evaluate_is_invalid_input(guard: Guard, path: str) -> None:
    record = {"a": ["x", 1, {"b": "y"}]}
    for call in (lambda: guard.mask(record, [path]), lambda: guard.protect(record, {path: "pii"})):
        with pytest.raises(InvalidInput, match="cannot be evaluated") as caught:
            call()
        assert "'x'" not in str(caught.value)


def test_classifications_and_token_classifications_use_no_key(guard: Guard) -> None:
    record = {"a": "x", "b": {"c": "y"}, "card": "4111 1111 1111 1111"}
    assert fields.classifications(record, {"$.a": "general", "$.b": {"class": "pii"}}) == {"general", "pii"}
    assert fields.classifications(record, detect=True, keep=["$.a"]) == {"payment"}
    sealed = guard.protect(record, {"$.a": "general", "$.b": "pii"})
    assert fields.classifications(sealed, {"$.a": "general"}) == set()  # already a token: nothing to seal
    assert fields.token_classifications(sealed) == {"general", "pii"}
    assert fields.token_classifications(sealed, ["$.a"]) == {"general"}
    with pytest.raises(ContextMismatch):
        fields.token_classifications({"a": sealed["b"]})


@pytest.mark.parametrize("spec", [
    {"class": "pii", "index": "no spaces"},
    {"class": "pii", "index": "i", "normalize": 5},
    {"class": "pii", "index": "i", "normalize": ["digits", "zap"]},
])
def test_a_bad_index_spec_names_its_field_before_anything_is_sealed(guard: Guard, spec: dict[str, Any]) -> None:
    with pytest.raises(InvalidInput, match=r"^field \$\.seat: "):
        guard.protect(BOOKING, {"$.seat": spec})


def test_a_key_named_like_a_jsonpath_operator_is_quoted_in_its_path() -> None:
    """jsonpath-ng reads ``where`` as an operator: its canonical path quotes it, and parses."""
    from kmsguard.jsonpaths import compile_path, format_path

    assert format_path(("where", 0, "wherenot")) == "$['where'][0]['wherenot']"
    compile_path(format_path(("where",)))
