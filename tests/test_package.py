"""The package surface: what ``import kmsguard`` costs and exports."""

from __future__ import annotations

import subprocess
import sys

import kmsguard


def test_import_stays_light() -> None:
    """boto3 (and the CLI's click/rich) load only when used, so importing the library is fast."""
    code = (
        "import sys, kmsguard; "
        "print(','.join(m for m in ('boto3', 'botocore', 'click', 'rich', 'kmsguard.cli') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == ""


def test_guard_and_every_error_are_exported() -> None:
    from kmsguard import errors

    for name in errors.__all__:
        assert getattr(kmsguard, name) is getattr(errors, name)
    assert {"Guard", "EnvelopeInfo"} <= set(kmsguard.__all__)
    codes = [getattr(errors, n).code for n in errors.__all__]
    assert len(codes) == len(set(codes))
