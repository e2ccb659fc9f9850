"""The local key file: permissions, passphrase, damage, versions and management calls."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from kmsguard import InvalidCiphertext, InvalidInput, KeyNotFound, KeyringError
from kmsguard.keyrings.base import KeyRequest
from kmsguard.keyrings.local import KEY_FILE_NAME, LocalKeyring

REQ = KeyRequest("general", "local:general", {"booking": "ABC123"})


def test_created_with_mode_0600_and_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "home" / KEY_FILE_NAME
    LocalKeyring.create(path, ["general"])
    assert (path.stat().st_mode & 0o777) == 0o600
    assert (path.parent.stat().st_mode & 0o077) == 0
    before = path.read_bytes()
    with pytest.raises(KeyringError):
        LocalKeyring.create(path, ["general"])
    assert path.read_bytes() == before


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o602, 0o610, 0o644])
def test_loose_permissions_are_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / KEY_FILE_NAME
    LocalKeyring.create(path, ["general"])
    os.chmod(path, mode)
    with pytest.raises(KeyringError) as info:
        LocalKeyring(path)
    assert "chmod 600" in str(info.value)
    os.chmod(path, 0o600)
    LocalKeyring(path)


def test_a_symlink_or_missing_file_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real.json"
    LocalKeyring.create(real, ["general"])
    link = tmp_path / KEY_FILE_NAME
    link.symlink_to(real)
    with pytest.raises(KeyringError):
        LocalKeyring(link)
    with pytest.raises(KeyringError) as info:
        LocalKeyring(tmp_path / "absent.json")
    assert "kmsguard init" in str(info.value)


def test_rewrites_keep_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / KEY_FILE_NAME
    keyring = LocalKeyring.create(path, ["general"])
    keyring.rotate("general")
    assert (path.stat().st_mode & 0o777) == 0o600


def test_passphrase_right_wrong_missing_and_unexpected(tmp_path: Path) -> None:
    sealed = tmp_path / "sealed" / KEY_FILE_NAME
    keyring = LocalKeyring.create(sealed, ["general"], passphrase="correct horse")
    text = sealed.read_text()
    doc = json.loads(text)
    assert doc["kdf"]["name"] == "scrypt" and "keys" not in doc
    material = keyring._keys["general"]["versions"]["1"]["material"]
    assert material not in text  # the key material is not in the file in clear

    dk = keyring.generate(REQ)
    reopened = LocalKeyring(sealed, passphrase="correct horse")
    assert reopened.unwrap(dk.wrapped, REQ).plaintext == dk.plaintext
    with pytest.raises(KeyringError) as info:
        LocalKeyring(sealed, passphrase="hunter2-xyzzy")
    assert "wrong passphrase" in str(info.value) and "xyzzy" not in str(info.value)
    with pytest.raises(KeyringError) as info:
        LocalKeyring(sealed)
    assert "KMSGUARD_PASSPHRASE" in str(info.value)

    plain = tmp_path / "plain" / KEY_FILE_NAME
    LocalKeyring.create(plain, ["general"])
    with pytest.raises(KeyringError) as info:
        LocalKeyring(plain, passphrase="correct horse")
    assert "not sealed" in str(info.value)


def test_a_sealed_file_stays_sealed_across_rotation(tmp_path: Path) -> None:
    path = tmp_path / KEY_FILE_NAME
    keyring = LocalKeyring.create(path, ["general"], passphrase="pw")
    keyring.rotate("general")
    assert "keys" not in json.loads(path.read_text())
    assert [v.version for v in LocalKeyring(path, passphrase="pw").versions()] == [1, 2]


@pytest.mark.parametrize(
    "damage",
    [
        lambda doc: "not json",
        lambda doc: json.dumps({**doc, "format": "other"}),
        lambda doc: json.dumps({**doc, "version": 2}),
        lambda doc: json.dumps({**doc, "keys": []}),
        lambda doc: json.dumps(
            {**doc, "keys": {"general": {"primary": 2, "versions": doc["keys"]["general"]["versions"]}}}
        ),
        lambda doc: json.dumps({**doc, "keys": {"bad name": doc["keys"]["general"]}}),
        lambda doc: json.dumps(
            {
                **doc,
                "keys": {
                    "general": {
                        "primary": 1,
                        "versions": {"1": {"material": "AAAA", "state": "enabled", "created": ""}},
                    }
                },
            }
        ),
        lambda doc: json.dumps(
            {**doc, "keys": {"general": {"primary": 1, "versions": {"01": doc["keys"]["general"]["versions"]["1"]}}}}
        ),
        lambda doc: json.dumps({**doc, "kdf": {"name": "scrypt", "salt": "AAAA", "n": 2**30, "r": 8, "p": 1}}),
    ],
)
def test_a_damaged_file_is_one_clear_error(tmp_path: Path, damage: object) -> None:
    path = tmp_path / KEY_FILE_NAME
    LocalKeyring.create(path, ["general"])
    doc = json.loads(path.read_text())
    damaged = damage(doc)  # type: ignore[operator]
    path.write_text(damaged)
    with pytest.raises(KeyringError) as info:
        LocalKeyring(path, passphrase="pw" if "scrypt" in damaged else None)
    assert "not a valid kmsguard key file" in str(info.value)


def test_wrapped_keys_bind_key_ref_and_context(tmp_path: Path) -> None:
    keyring = LocalKeyring.create(tmp_path / KEY_FILE_NAME, ["general", "pii"])
    dk = keyring.generate(REQ)
    (w,) = dk.wrapped
    assert (w.provider, w.key_ref, len(w.wrapped)) == ("local", "local:general:v1", 60)
    assert keyring.unwrap(dk.wrapped, REQ).plaintext == dk.plaintext
    for other in (
        KeyRequest("general", "local:general", {"booking": "XYZ"}),
        KeyRequest("general", "local:general", {}),
        KeyRequest("pii", "local:general", {"booking": "ABC123"}),
    ):
        with pytest.raises(InvalidCiphertext):
            keyring.unwrap(dk.wrapped, other)
    relabelled = type(w)("local", "local:pii:v1", w.wrapped)
    with pytest.raises(InvalidCiphertext):
        keyring.unwrap((relabelled,), REQ)


def test_wrap_adds_a_copy_and_rewrap_uses_the_primary(tmp_path: Path) -> None:
    keyring = LocalKeyring.create(tmp_path / KEY_FILE_NAME, ["general", "pii"])
    dk = keyring.generate(REQ)
    both = keyring.wrap(dk, KeyRequest("general", "local:pii", REQ.context))
    assert [w.key_ref for w in both.wrapped] == ["local:general:v1", "local:pii:v1"]
    assert keyring.unwrap(both.wrapped[1:], KeyRequest("general", "local:pii", REQ.context)).plaintext == dk.plaintext
    keyring.rotate("general")
    (moved,) = keyring.rewrap(dk.wrapped, REQ)
    assert moved.key_ref == "local:general:v2"
    assert keyring.unwrap((moved,), REQ).plaintext == dk.plaintext


def test_key_management(tmp_path: Path) -> None:
    keyring = LocalKeyring.create(tmp_path / KEY_FILE_NAME, ["general"])
    info = keyring.create_key("local:loyalty")
    assert (info.key_ref, info.primary, info.state) == ("local:loyalty:v1", True, "enabled")
    with pytest.raises(InvalidInput):
        keyring.create_key("loyalty")
    with pytest.raises(InvalidInput):
        keyring.create_key("alias/not-local")
    with pytest.raises(KeyNotFound):
        keyring.rotate("absent")
    with pytest.raises(KeyNotFound):
        keyring.set_state("general", 7, enabled=False)
    with pytest.raises(KeyNotFound):
        keyring.generate(KeyRequest("x", "absent"))
    rotated = keyring.rotate("loyalty")
    assert (rotated.version, rotated.primary) == (2, True)
    assert keyring.set_state("loyalty", 1, enabled=False).state == "disabled"
    listed = {(v.name, v.version): (v.state, v.primary) for v in LocalKeyring(keyring.path).versions()}
    assert listed == {
        ("general", 1): ("enabled", True),
        ("loyalty", 1): ("disabled", False),
        ("loyalty", 2): ("enabled", True),
    }


def test_secrets_for_other_components_are_stable_and_not_keys(tmp_path: Path) -> None:
    keyring = LocalKeyring.create(tmp_path / KEY_FILE_NAME, ["general"])
    first = keyring.secret("audit-hmac")
    assert len(first) == 32
    assert LocalKeyring(keyring.path).secret("audit-hmac") == first
    assert keyring.secret("other") != first
    assert [v.name for v in keyring.versions()] == ["general"]


def test_the_wrapped_key_and_sealed_file_are_as_documented(tmp_path: Path) -> None:
    """FORMAT.md's description is enough to open a local wrapped key and a sealed key file."""
    import base64

    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

    path = tmp_path / KEY_FILE_NAME
    keyring = LocalKeyring.create(path, ["general"], passphrase="pässword")
    request = KeyRequest("general", "local:general", {"note": "empty", "z": "\u00e9\n"})
    dk = keyring.generate(request)
    (w,) = dk.wrapped

    doc = json.loads(path.read_text())
    kdf = doc["kdf"]
    kek = Scrypt(salt=base64.b64decode(kdf["salt"]), length=32, n=kdf["n"], r=kdf["r"], p=kdf["p"]).derive(
        "pässword".encode()
    )
    sealed = base64.b64decode(doc["sealed"])
    keys = json.loads(AESGCM(kek).decrypt(sealed[:12], sealed[12:], b"kmsguard-local-keyring"))
    material = base64.b64decode(keys["general"]["versions"]["1"]["material"])

    bound = '[["kmsguard:classification","general"],["note","empty"],["z","\u00e9\\n"]]'
    aad = b"kmsguard local wrap v1\x00" + b"local:general:v1" + b"\x00" + bound.encode("utf-8")
    assert len(w.wrapped) == 60
    assert AESGCM(material).decrypt(w.wrapped[:12], w.wrapped[12:], aad) == dk.plaintext
