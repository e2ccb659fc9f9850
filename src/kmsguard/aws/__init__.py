"""AWS KMS plumbing: settings, the shared client factory, error mapping, middleware, redaction.

The keyring built on it is :class:`kmsguard.keyrings.aws_kms.AwsKmsKeyring`; key
management (status, rotation, creation) is in :mod:`kmsguard.aws.admin`.
"""

from kmsguard.aws.arn import KeyArn
from kmsguard.aws.clients import USER_AGENT, ClientFactory
from kmsguard.aws.errors import map_error
from kmsguard.aws.middleware import KmsStats
from kmsguard.aws.settings import PRESETS, AwsSettings

__all__ = ["PRESETS", "USER_AGENT", "AwsSettings", "ClientFactory", "KeyArn", "KmsStats", "map_error"]
