"""ConfigTable, the one validation helper, and every section that reads through it.

Each section refuses a setting it does not know and a value of the wrong type, with a
message that starts with the setting's dotted name (or the variable that set it).
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kmsguard import ConfigurationError
from kmsguard.audit.settings import AuditSettings
from kmsguard.aws.settings import AwsSettings
from kmsguard.config import load_settings
from kmsguard.config_table import ConfigTable
from kmsguard.keyrings.multi_region import MultiRegionOptions
from kmsguard.metrics import build_metrics

NAMES = st.from_regex(r"[a-z][a-z0-9_]{0,15}", fullmatch=True)
#: Any value a TOML document can hold.
TOML_VALUES = st.recursive(
    st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(NAMES, inner, max_size=3),
    max_leaves=6,
)


def failure(call: Any) -> str:
    with pytest.raises(ConfigurationError) as info:
        call()
    assert info.value.code == "CONFIGURATION_ERROR"
    return info.value.message


# ---------------------------------------------------------------------- the helper


@given(known=st.sets(NAMES, max_size=5), extra=NAMES, value=TOML_VALUES)
def test_a_setting_outside_known_is_refused_by_name(known: set[str], extra: str, value: object) -> None:
    raw = {name: 1 for name in known} | {extra: value}
    if extra in known:
        ConfigTable(raw, "section", known)
    else:
        assert failure(lambda: ConfigTable(raw, "section", known)).startswith(f"section.{extra}: unknown setting")


@given(raw=st.dictionaries(NAMES, TOML_VALUES, max_size=4))
def test_known_none_accepts_any_name(raw: dict[str, Any]) -> None:
    assert ConfigTable(raw, "aws.endpoints", None).names() == list(raw)


@given(value=TOML_VALUES.filter(lambda v: not isinstance(v, dict)))
def test_a_table_must_be_a_table(value: object) -> None:
    assert failure(lambda: ConfigTable(value, "metrics", ())) == "metrics: must be a table"
    parent = ConfigTable({"cache": value}, "classifications.pii", {"cache"})
    assert failure(lambda: parent.table("cache", ())) == "classifications.pii.cache: must be a table"
    assert failure(lambda: parent.raw_table("cache")) == "classifications.pii.cache: must be a table"


@given(value=TOML_VALUES)
def test_each_typed_read_returns_a_value_of_its_type_or_names_the_setting(value: object) -> None:
    t = ConfigTable({"x": value}, "s", {"x"})
    reads: list[tuple[Any, Any]] = [
        (lambda: t.boolean("x", False), lambda v: isinstance(v, bool)),
        (lambda: t.integer("x", 0), lambda v: type(v) is int),
        (lambda: t.number("x", 0.0), lambda v: type(v) is float and math.isfinite(v)),
        (lambda: t.string("x", "d"), lambda v: isinstance(v, str) and v != ""),
        (lambda: t.optional_string("x"), lambda v: isinstance(v, str) and v != ""),
        (lambda: t.strings("x"), lambda v: isinstance(v, list) and all(isinstance(s, str) and s for s in v)),
        (lambda: t.choice("x", ("a", "b"), "a"), lambda v: v in ("a", "b")),
    ]
    for read, of_its_type in reads:
        try:
            result = read()
        except ConfigurationError as exc:
            assert exc.message.startswith("s.x: must be ")
        else:
            assert of_its_type(result)
            assert result == (float(value) if type(result) is float else value)


@given(value=st.integers(), low=st.integers(-5, 5), high=st.integers(-5, 5))
def test_integer_bounds_are_inclusive(value: int, low: int, high: int) -> None:
    t = ConfigTable({"n": value}, "", {"n"})
    if low <= value <= high:
        assert t.integer("n", 0, minimum=low, maximum=high) == value
    else:
        message = failure(lambda: t.integer("n", 0, minimum=low, maximum=high))
        assert message == f"n: must be a whole number between {low} and {high}"


@given(value=st.floats(allow_nan=False, allow_infinity=False))
def test_above_is_exclusive(value: float) -> None:
    t = ConfigTable({"timeout": value}, "aws", {"timeout"})
    if value > 0:
        assert t.number("timeout", 1.0, above=0) == value
    else:
        assert failure(lambda: t.number("timeout", 1.0, above=0)) == "aws.timeout: must be a finite number above 0"


def test_defaults_apply_when_absent() -> None:
    t = ConfigTable({}, "s", {"a"})
    assert t.boolean("a", True) is True
    assert t.integer("a", 3) == 3 and t.number("a", 2) == 2.0
    assert t.string("a", "d") == "d" and t.string("a", "") == ""
    assert t.optional_string("a") is None and t.optional_boolean("a") is None
    assert t.strings("a") == [] and t.choice("a", ("x", "y"), "y") == "y"
    assert t.table("a", ()).names() == [] and t.raw_table("a") == {}
    assert failure(lambda: t.string("a")) == "s.a: must be set"


def test_an_empty_string_means_unset_only_where_the_default_is_empty() -> None:
    t = ConfigTable({"a": ""}, "s", {"a"})
    assert t.string("a", "") == ""
    assert failure(lambda: t.string("a", "d")) == "s.a: must be a non-empty string"
    assert failure(lambda: t.optional_string("a")) == "s.a: must be a non-empty string"


def test_a_variable_wins_and_takes_the_blame() -> None:
    t = ConfigTable({"sink": "jsonl"}, "audit", {"sink"}, {"KMSGUARD_AUDIT_SINK": "kafka"})
    assert failure(lambda: t.choice("sink", ("sqlite", "jsonl"), "sqlite", var="KMSGUARD_AUDIT_SINK")) == (
        "KMSGUARD_AUDIT_SINK: must be one of sqlite, jsonl, not 'kafka'"
    )
    empty = ConfigTable({"sink": "jsonl"}, "audit", {"sink"}, {"KMSGUARD_AUDIT_SINK": ""})
    assert empty.choice("sink", ("sqlite", "jsonl"), "sqlite", var="KMSGUARD_AUDIT_SINK") == "jsonl"


def test_a_pattern_says_what_the_value_must_look_like() -> None:
    t = ConfigTable({"url": "ftp://x"}, "aws", {"url"})
    assert failure(lambda: t.string("url", pattern=re.compile("https?://.+"), shape="an http(s) URL")) == (
        "aws.url: must be an http(s) URL"
    )


@given(secret=st.text(min_size=1, max_size=40))
def test_a_value_is_repeated_only_when_it_is_a_plain_word(secret: str) -> None:
    """A DSN or key pasted into the wrong setting must not reach a log."""
    message = failure(lambda: ConfigTable({"sink": secret}, "audit", {"sink"}).choice("sink", ("sqlite",), "x"))
    if secret != "sqlite" and not re.fullmatch(r"[A-Za-z0-9_.-]{1,32}", secret):
        assert secret not in message.removeprefix("audit.sink: must be one of sqlite")


# ---------------------------------------------------------------------- every section


def settings_with(tmp_path: Path, toml: str, **env: str):  # type: ignore[no-untyped-def]
    (tmp_path / "kmsguard.toml").write_text(toml)
    return load_settings({"KMSGUARD_HOME": str(tmp_path), **env})


SECTIONS = [
    ("", lambda s: s),
    ("classifications.pii", lambda s: s),
    ("classifications.pii.cache", lambda s: s),
    ("aws", lambda s: AwsSettings.from_section(s.section("aws"), {"AWS_REGION": "eu-west-1"}, s.environment)),
    ("aws", lambda s: MultiRegionOptions.from_section(s.section("aws"))),
    ("audit", AuditSettings.of),
    ("metrics", build_metrics),
]


@pytest.mark.parametrize(("table", "read"), SECTIONS)
def test_every_section_refuses_an_unknown_setting(tmp_path: Path, table: str, read: Any) -> None:
    header = f"[{table}]\n" if table else ""
    message = failure(lambda: read(settings_with(tmp_path, f"{header}colour = 1\n")))
    assert message == f"{table + '.' if table else ''}colour: unknown setting"


@pytest.mark.parametrize(
    ("toml", "read", "message"),
    [
        ("backend = true\n", None, "backend: must be one of local, aws"),
        ('[classifications.pii]\nstrict_audit = "no"\n', None, "classifications.pii.strict_audit: must be true or"),
        (
            "[classifications.pii.cache]\nmax_bytes = 1.5\n",
            None,
            "classifications.pii.cache.max_bytes: must be a whole",
        ),
        ('[aws]\nmax_attempts = "3"\n', SECTIONS[3][1], "aws.max_attempts: must be a whole number of at least 1"),
        ("[aws]\nbreaker_cooldown = 0\n", SECTIONS[4][1], "aws.breaker_cooldown: must be a finite number above 0"),
        ("[aws]\nwrap_in_all_regions = 1\n", SECTIONS[4][1], "aws.wrap_in_all_regions: must be true or false"),
        ("[aws.keys]\npayment = 1\n", SECTIONS[4][1], "aws.keys.payment: must be a table"),
        ('[aws.keys.payment]\neu-west-1 = ""\n', SECTIONS[4][1], "aws.keys.payment.eu-west-1: must be a non-empty"),
        ('[audit]\nsink = "kafka"\n', AuditSettings.of, "audit.sink: must be one of sqlite, postgres, jsonl, none"),
        ('[audit]\nsink = "postgres"\n', AuditSettings.of, "audit.dsn: the postgres sink needs a dsn"),
        ('[audit]\nstrict = "yes"\n', AuditSettings.of, "audit.strict: must be true or false"),
        (
            "[audit]\nflush_interval = 0\n",
            AuditSettings.of,
            "audit.flush_interval: must be a finite number between 0.001 and 60",
        ),
        ("[audit]\nmax_spool_mb = 1.5\n", AuditSettings.of, "audit.max_spool_mb: must be a whole number of at least 1"),
        ('[audit]\npath = ""\n', AuditSettings.of, "audit.path: must be a non-empty string"),
        ('[metrics]\nenabled = "yes"\n', build_metrics, "metrics.enabled: must be true or false"),
        ("[metrics]\nenabled = false\nmax_buffer = 0\n", build_metrics, "metrics.max_buffer: must be a whole number"),
        ("[metrics]\nflush_interval = -1\n", build_metrics, "metrics.flush_interval: must be a finite number above 0"),
        ("[metrics]\nnamespace = 3\n", build_metrics, "metrics.namespace: must be a non-empty string"),
    ],
)
def test_every_section_refuses_an_ill_typed_value(tmp_path: Path, toml: str, read: Any, message: str) -> None:
    assert failure(lambda: (read or (lambda s: s))(settings_with(tmp_path, toml))).startswith(message)


def test_an_audit_variable_is_named_when_it_is_wrong(tmp_path: Path) -> None:
    s = settings_with(tmp_path, "", KMSGUARD_AUDIT_DELIVERY="later")
    assert (
        failure(lambda: AuditSettings.of(s)) == "KMSGUARD_AUDIT_DELIVERY: must be one of process, thread, not 'later'"
    )


def test_valid_sections_still_read_as_before(tmp_path: Path) -> None:
    s = settings_with(
        tmp_path,
        '[audit]\nsink = "jsonl"\nstrict = false\nflush_interval = 1\nmax_spool_mb = 2\n'
        '[metrics]\nflush_interval = 5\nmax_buffer = 10\nemf = ""\n'
        '[aws]\nbreaker_failures = 5\n[aws.keys.payment]\neu-west-1 = "arn:aws:kms:eu-west-1:111122223333:key/k"\n',
    )
    audit = AuditSettings.of(s)
    assert (audit.sink, audit.path, audit.strict, audit.flush_interval, audit.max_spool_bytes) == (
        "jsonl",
        tmp_path / "audit.jsonl",
        False,
        1.0,
        2 << 20,
    )
    metrics = build_metrics(s)
    assert metrics is not None and metrics.exporter is None
    options = MultiRegionOptions.from_section(s.section("aws"))
    assert options.breaker_failures == 5 and not options.wrap_in_all_regions
    assert options.region_keys == {"payment": {"eu-west-1": "arn:aws:kms:eu-west-1:111122223333:key/k"}}


# ---------------------------------------------------------------------- whole files

WORDS = st.text("abcdefgh-_ 019", max_size=12)  # no path separators: [metrics] emf names a file
SCALARS = st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats() | WORDS


def toml_of(value: object) -> str:
    """A TOML value (inline tables and arrays): enough to write any document the tests draw."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, int | str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_of(v) for v in value) + "]"
    assert isinstance(value, dict)
    return "{" + ", ".join(f"{json.dumps(k)} = {toml_of(v)}" for k, v in value.items()) + "}"


def tables(names: list[str], values: st.SearchStrategy[object]) -> st.SearchStrategy[dict[str, object]]:
    """Tables of known names and one unknown, with values that are sometimes of the right type."""
    return st.dictionaries(st.sampled_from([*names, "colour"]), values, max_size=4)


VALUES = SCALARS | st.lists(SCALARS, max_size=2)
CLASS = tables(
    ["key", "required_context", "kms_context_keys", "strict_audit", "regions"], VALUES
) | st.fixed_dictionaries({"cache": tables(["reuse", "max_age", "max_messages", "max_bytes", "decrypt_ttl"], VALUES)})
DOCUMENTS = st.fixed_dictionaries(
    {},
    optional={
        "backend": st.sampled_from(["local", "aws"]) | SCALARS,
        "environment": st.sampled_from(["development", "production"]) | SCALARS,
        "app": VALUES,
        "classifications": st.dictionaries(
            st.sampled_from(["general", "payment", "loyalty", "Bad"]), CLASS, max_size=2
        ),
        "aws": tables(["regions", "max_attempts", "read_timeout", "profile", "breaker_failures", "keys"], VALUES),
        "audit": tables(["sink", "strict", "flush_interval", "max_spool_mb", "delivery", "path"], VALUES),
        "metrics": tables(["enabled", "namespace", "emf", "cloudwatch", "flush_interval", "max_buffer"], VALUES),
        "colour": VALUES,
    },
)


@settings(max_examples=200, deadline=None)
@given(doc=DOCUMENTS)
def test_any_document_loads_or_fails_with_one_configuration_error(doc: dict[str, object]) -> None:
    """Whatever the file holds, every section either reads it or names what is wrong: never a traceback."""
    with tempfile.TemporaryDirectory() as home:
        text = "".join(f"{json.dumps(k)} = {toml_of(v)}\n" for k, v in doc.items())
        (Path(home) / "kmsguard.toml").write_text(text)
        try:
            s = load_settings({"KMSGUARD_HOME": home})
            for _, read in SECTIONS[3:]:
                built = read(s)
                if hasattr(built, "close"):
                    built.close()
        except ConfigurationError as exc:
            name = exc.message.partition(":")[0]
            assert name and " " not in name.removeprefix("classifications.Bad")
            if "colour" in exc.message:
                assert exc.message.endswith("colour: unknown setting")
