"""[aws] settings: presets per environment, overrides, regions, endpoints, and errors that name the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kmsguard.aws import PRESETS, AwsSettings, ClientFactory
from kmsguard.config import load_settings
from kmsguard.errors import ConfigurationError
from kmsguard.keyrings.aws_kms import AwsKmsKeyring
from kmsguard.stack import build_aws_keyring

ENV = {"AWS_REGION": "eu-west-1"}


def settings(
    section: dict[str, Any] | None = None, env: dict[str, str] | None = None, environment: str = "development"
) -> AwsSettings:
    return AwsSettings.from_section(section or {}, ENV if env is None else env, environment)


@pytest.mark.parametrize("environment", ["development", "staging", "production"])
def test_presets_per_environment(environment: str) -> None:
    s, preset = settings(environment=environment), PRESETS[environment]
    assert (s.max_attempts, s.connect_timeout, s.read_timeout, s.max_pool_connections, s.operation_timeout) == (
        preset.max_attempts,
        preset.connect_timeout,
        preset.read_timeout,
        preset.max_pool_connections,
        preset.operation_timeout,
    )


def test_the_issue_s_preset_values() -> None:
    dev, prod = settings(), settings(environment="production")
    assert (dev.max_attempts, dev.connect_timeout, dev.read_timeout, dev.max_pool_connections) == (2, 2, 10, 10)
    assert (prod.max_attempts, prod.connect_timeout, prod.read_timeout, prod.max_pool_connections) == (3, 5, 30, 50)


def test_every_value_overridable_and_reaches_botocore() -> None:
    s = settings(
        {
            "max_attempts": 7,
            "connect_timeout": 1.5,
            "read_timeout": 4,
            "max_pool_connections": 12,
            "tcp_keepalive": False,
            "operation_timeout": 9,
        }
    )
    config = ClientFactory(s).config("eu-west-1")
    assert config.retries == {"mode": "standard", "total_max_attempts": 1}  # kmsguard makes the 7 attempts
    assert s.max_attempts == 7
    assert (config.connect_timeout, config.read_timeout, config.max_pool_connections) == (1.5, 4, 12)
    assert config.tcp_keepalive is False and config.user_agent_extra.startswith("kmsguard/")
    assert s.operation_timeout == 9


def test_pool_is_at_least_the_concurrency() -> None:
    assert settings({"concurrency": 64}).max_pool_connections == 64
    assert settings({"concurrency": 4}).max_pool_connections == 10


def test_region_sources_in_order() -> None:
    assert settings({"regions": ["eu-central-1", "eu-west-1"]}).regions == ("eu-central-1", "eu-west-1")
    assert settings({"regions": ["eu-central-1"]}, {**ENV, "KMSGUARD_REGIONS": "us-east-1, us-west-2"}).regions == (
        "us-east-1",
        "us-west-2",
    )
    assert settings(env={"AWS_DEFAULT_REGION": "ap-south-1"}).regions == ("ap-south-1",)
    assert settings(env={"AWS_REGION": "ca-central-1", "AWS_DEFAULT_REGION": "ap-south-1"}).region == "ca-central-1"
    with pytest.raises(ConfigurationError, match="no region configured"):
        settings(env={})


def test_endpoints_per_region_then_the_standard_variables() -> None:
    s = settings(
        {"endpoints": {"eu-west-1": "https://vpce-1.kms.eu-west-1.vpce.amazonaws.com"}},
        {**ENV, "AWS_ENDPOINT_URL": "http://127.0.0.1:1", "AWS_ENDPOINT_URL_KMS": "http://127.0.0.1:2"},
    )
    assert s.endpoint_for("eu-west-1") == "https://vpce-1.kms.eu-west-1.vpce.amazonaws.com"
    assert s.endpoint_for("us-east-1") == "http://127.0.0.1:2"
    assert settings(env={**ENV, "AWS_ENDPOINT_URL": "http://127.0.0.1:1"}).endpoint_for("x") == "http://127.0.0.1:1"
    ignored = {**ENV, "AWS_ENDPOINT_URL": "http://127.0.0.1:1", "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS": "true"}
    assert settings(env=ignored).endpoint_for("eu-west-1") is None


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"read_timeout": "30"}, "aws.read_timeout: must be a finite number"),
        ({"connect_timeout": 0}, "aws.connect_timeout: must be a finite number above 0"),
        ({"read_timeout": float("inf")}, "aws.read_timeout: must be a finite number above 0"),
        ({"operation_timeout": -1}, "aws.operation_timeout: must be a finite number of at least 0"),
        ({"concurrency": -1}, "aws.concurrency: must be a whole number of at least 0"),
        ({"endpoints": {"Europe": "https://kms.example"}}, "aws.endpoints.Europe: not a region name"),
        ({"endpoints": "https://kms.example"}, "aws.endpoints: must be a table"),
        ({"max_attempts": 0}, "aws.max_attempts: must be a whole number of at least 1"),
        ({"max_attempts": True}, "aws.max_attempts: must be a whole number"),
        ({"regions": "eu-west-1"}, "aws.regions: must be a list"),
        ({"regions": ["Europe"]}, "aws.regions: 'Europe' is not a region name"),
        ({"regions": []}, "aws.regions: must name at least one region"),
        ({"regions": ["eu-west-1", "eu-west-1"]}, "aws.regions: a region is listed twice"),
        ({"role_arn": "admin"}, "aws.role_arn: must be an IAM role ARN"),
        ({"role_duration_seconds": 60}, "aws.role_duration_seconds: must be a whole number of at least 900"),
        ({"profile": ""}, "aws.profile: must be a non-empty string"),
        ({"endpoints": {"eu-west-1": "ftp://x"}}, "aws.endpoints.eu-west-1: must be an http(s) URL"),
        ({"tcp_keepalive": "yes"}, "aws.tcp_keepalive: must be true or false"),
        ({"secret_access_key": "x"}, "aws.secret_access_key: unknown setting"),
        ({"read_timout": 3}, "aws.read_timout: unknown setting (did you mean 'read_timeout'?)"),
    ],
)
def test_bad_values_name_the_field(section: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        settings(section)
    assert info.value.message.startswith(message)


def test_backend_aws_from_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "kmsguard.toml").write_text(
        'backend = "aws"\nenvironment = "production"\n[aws]\nregions = ["eu-west-1"]\nread_timeout = 12\n'
    )
    keyring = build_aws_keyring(load_settings({"KMSGUARD_HOME": str(tmp_path)}))
    assert isinstance(keyring, AwsKmsKeyring) and keyring.region == "eu-west-1"
    assert keyring.clients.settings.read_timeout == 12 and keyring.clients.settings.max_attempts == 3
