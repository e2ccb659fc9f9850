"""Builds what Settings ask for: the keyring stack and the operation observers.

This is the composition root behind ``Guard.from_env()``: the only module that knows
which concrete keyrings and observers exist. Backends are imported lazily, so a local
setup never imports boto3.
"""

from __future__ import annotations

from kmsguard.config import Settings
from kmsguard.errors import ConfigurationError
from kmsguard.keyrings.base import Keyring
from kmsguard.keyrings.local import KEY_FILE_NAME, LocalKeyring
from kmsguard.operation import Observer


def build_keyring(settings: Settings) -> Keyring:
    if settings.backend == "local":
        return LocalKeyring(settings.home / KEY_FILE_NAME, settings.passphrase)
    raise ConfigurationError(f"backend: {settings.backend!r} is not available in this build")


def build_observers(settings: Settings, keyring: Keyring) -> list[Observer]:
    return []
