"""Settings from kmsguard.toml and KMSGUARD_* variables; every mistake names its field."""

from __future__ import annotations

from pathlib import Path

import pytest

from kmsguard import ConfigurationError, ContextRequired, Guard
from kmsguard.config import load_settings
from kmsguard.keyrings.local import KEY_FILE_NAME, LocalKeyring
from kmsguard.policy import DEFAULT_CACHE_LIMITS, CacheLimits


def settings_with(tmp_path: Path, toml: str, **env: str):  # type: ignore[no-untyped-def]
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    (home / "kmsguard.toml").write_text(toml)
    return load_settings({"KMSGUARD_HOME": str(home), **env})


def test_defaults_without_any_file(tmp_path: Path) -> None:
    s = load_settings({"KMSGUARD_HOME": str(tmp_path / "nowhere")})
    assert (s.backend, s.app, s.environment, s.config_path) == ("local", "kmsguard", "development", None)
    assert s.policy.names() == ["general", "pii", "payment"]
    assert [c.key for c in s.policy] == ["local:general", "local:pii", "local:payment"]
    payment = s.policy.get("payment")
    assert payment.required_context == {"purpose"} and payment.strict_audit
    assert payment.cache == DEFAULT_CACHE_LIMITS["payment"]
    assert payment.cache.max_messages < s.policy.get("general").cache.max_messages
    assert s.policy.get("general").required_context == frozenset()
    assert "@" in s.principal


def test_aws_backend_default_key_names(tmp_path: Path) -> None:
    s = settings_with(tmp_path, 'app = "booking"\nenvironment = "production"\n', KMSGUARD_BACKEND="aws")
    assert s.backend == "aws"
    assert s.policy.get("pii").key == "alias/booking-pii-production"


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    s = settings_with(
        tmp_path,
        'backend = "aws"\napp = "a"\nenvironment = "staging"\nprincipal = "svc"\n'
        '[classifications.pii]\nkey = "alias/from-file"\n',
        KMSGUARD_BACKEND="local",
        KMSGUARD_APP="b",
        KMSGUARD_ENVIRONMENT="production",
        KMSGUARD_PRINCIPAL="ops",
        KMSGUARD_KEY_PII="local:pii-2",
        KMSGUARD_KEY_PAYMENT="local:cards",
    )
    assert (s.backend, s.app, s.environment, s.principal) == ("local", "b", "production", "ops")
    assert s.policy.get("pii").key == "local:pii-2"
    assert s.policy.get("payment").key == "local:cards"


def test_kmsguard_config_names_another_file(tmp_path: Path) -> None:
    other = tmp_path / "elsewhere.toml"
    other.write_text('environment = "staging"\n')
    s = load_settings({"KMSGUARD_HOME": str(tmp_path / "home"), "KMSGUARD_CONFIG": str(other)})
    assert s.environment == "staging" and s.config_path == other
    with pytest.raises(ConfigurationError) as info:
        load_settings({"KMSGUARD_HOME": str(tmp_path), "KMSGUARD_CONFIG": str(tmp_path / "missing.toml")})
    assert "KMSGUARD_CONFIG" in str(info.value)


def test_a_user_added_classification(tmp_path: Path) -> None:
    s = settings_with(
        tmp_path,
        "[classifications.loyalty]\n"
        'required_context = ["member"]\n'
        'kms_context_keys = ["member"]\n'
        "[classifications.loyalty.cache]\nmax_age = 30\nmax_messages = 50\n",
        KMSGUARD_KEY_LOYALTY="local:points",
    )
    loyalty = s.policy.get("loyalty")
    assert s.policy.names() == ["general", "pii", "payment", "loyalty"]
    assert loyalty.key == "local:points"
    assert loyalty.required_context == {"member"} and loyalty.kms_context_keys == {"member"}
    assert loyalty.cache == CacheLimits(max_age=30, max_messages=50)
    assert not loyalty.strict_audit

    LocalKeyring.create(s.home / KEY_FILE_NAME, ["general", "pii", "payment", "points"])
    with Guard.from_settings(s) as guard:
        with pytest.raises(ContextRequired):
            guard.encrypt(b"1200 points", "loyalty")
        sealed = guard.encrypt(b"1200 points", "loyalty", {"member": "M-7", "tier": "gold"})
        assert guard.decrypt(sealed, {"member": "M-7"}) == b"1200 points"
        assert guard.inspect(sealed).keys[0]["key_ref"] == "local:points:v1"


def test_payment_can_drop_its_required_context(tmp_path: Path) -> None:
    s = settings_with(tmp_path, "[classifications.payment]\nrequired_context = []\n")
    assert s.policy.get("payment").required_context == frozenset()


@pytest.mark.parametrize(
    ("toml", "env", "field"),
    [
        ("backend = \n", {}, "not valid TOML"),
        ('colour = "blue"\n', {}, "colour: unknown setting"),
        ('envronment = "staging"\n', {}, "envronment: unknown setting (did you mean 'environment'?)"),
        ('backend = "gcp"\n', {}, "backend:"),
        ("", {"KMSGUARD_BACKEND": "gcp"}, "KMSGUARD_BACKEND: must be one of local, aws, not 'gcp'"),
        ("", {"KMSGUARD_APP": "a b"}, "KMSGUARD_APP: must be 1-64 characters"),
        ("", {"KMSGUARD_ENVIRONMENT": "prod"}, "KMSGUARD_ENVIRONMENT:"),
        ("backend = 1\n", {}, "backend:"),
        ('environment = "prod"\n', {}, "environment:"),
        ('app = "has space"\n', {}, "app:"),
        ("classifications = 1\n", {}, "classifications:"),
        ('[classifications."Bad Name"]\n', {}, "classifications.Bad Name:"),
        ("[classifications]\npii = 3\n", {}, "classifications.pii:"),
        ("[classifications.pii]\ncolour = 1\n", {}, "classifications.pii.colour: unknown setting"),
        ("[classifications.pii]\nkey = 5\n", {}, "classifications.pii.key:"),
        ('[classifications.pii]\nkey = ""\n', {}, "classifications.pii.key:"),
        ('[classifications.payment]\nrequired_context = "purpose"\n', {}, "classifications.payment.required_context:"),
        ('[classifications.pii]\nregions = [""]\n', {}, "classifications.pii.regions:"),
        ('[classifications.pii]\nstrict_audit = "yes"\n', {}, "classifications.pii.strict_audit:"),
        ("[classifications.pii]\ncache = 1\n", {}, "classifications.pii.cache:"),
        ('[classifications.pii.cache]\nmax_age = "1m"\n', {}, "classifications.pii.cache.max_age:"),
        ("[classifications.pii.cache]\nmax_age = nan\n", {}, "classifications.pii.cache.max_age:"),
        ("[classifications.pii.cache]\nmax_age = inf\n", {}, "classifications.pii.cache.max_age:"),
        ("[classifications.pii.cache]\nmax_messages = 1.5\n", {}, "classifications.pii.cache.max_messages:"),
        ("[classifications.pii.cache]\nreuse = 1\n", {}, "classifications.pii.cache.reuse:"),
        ("[classifications.pii.cache]\nmax_age = -1\n", {}, "classifications.pii.cache:"),
        ("[classifications.pii.cache]\nmax_messages = 0\n", {}, "classifications.pii.cache:"),
        ("[classifications.pii.cache]\nttl = 1\n", {}, "classifications.pii.cache.ttl: unknown setting"),
        ("aws = 1\n", {}, "aws: must be a table"),
        ('audit = "sqlite"\n', {}, "audit: must be a table"),
        ("metrics = true\n", {}, "metrics: must be a table"),
        ("principal = 7\n", {}, "principal: must be a non-empty string"),
        ("", {"KMSGUARD_KEY_LOYALTY": "local:x"}, "KMSGUARD_KEY_LOYALTY:"),
    ],
)
def test_bad_settings_name_the_field(tmp_path: Path, toml: str, env: dict[str, str], field: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        settings_with(tmp_path, toml, **env)
    assert field in str(info.value)
    assert info.value.code == "CONFIGURATION_ERROR"


def test_a_non_local_key_with_the_local_backend_names_the_field(tmp_path: Path) -> None:
    s = settings_with(tmp_path, "", KMSGUARD_KEY_PII="alias/kmsguard-pii")
    with pytest.raises(ConfigurationError) as info:
        Guard.from_settings(s)
    assert "classifications.pii.key" in str(info.value) and "KMSGUARD_KEY_PII" in str(info.value)


def test_component_sections_are_kept_raw(tmp_path: Path) -> None:
    s = settings_with(tmp_path, '[aws]\nregion = "eu-west-1"\n[audit]\nsink = "sqlite"\n')
    assert s.section("aws") == {"region": "eu-west-1"}
    assert s.section("audit") == {"sink": "sqlite"}
    assert s.section("server") == {}


def test_passphrase_comes_from_the_environment_only(tmp_path: Path) -> None:
    assert load_settings({"KMSGUARD_HOME": str(tmp_path)}).passphrase is None
    assert load_settings({"KMSGUARD_HOME": str(tmp_path), "KMSGUARD_PASSPHRASE": ""}).passphrase is None
    assert load_settings({"KMSGUARD_HOME": str(tmp_path), "KMSGUARD_PASSPHRASE": "pw"}).passphrase == "pw"
