"""``KMSGUARD_PURE=1``: run the compiled hot path's modules as the plain Python they are compiled from.

An installed wheel imports the Cython-compiled extension of each module in
:data:`MODULES` (setup.py builds them) ahead of its ``.py`` source. With ``KMSGUARD_PURE=1``
in the environment when kmsguard is first imported, a finder placed first on
``sys.meta_path`` imports each from its source instead, so one install can run the
test suite against both builds (``make test`` does: noxfile.py's ``tests-pure``
session). Behaviour is the same either way; only speed differs. Each module's
``COMPILED`` says which build is running.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from pathlib import Path
from types import ModuleType

#: The modules setup.py compiles (tests/test_fastpath.py holds the two lists equal).
MODULES = ("kmsguard.fastpath", "kmsguard.plans", "kmsguard.nonces", "kmsguard.histogram", "kmsguard.audit.frames")


def requested(env: dict[str, str] | None = None) -> bool:
    """Whether the environment asks for the plain-Python build."""
    return (os.environ if env is None else env).get("KMSGUARD_PURE", "") == "1"


class SourceFinder:
    """Finds each of :data:`MODULES` as its ``.py`` source in its package's directory (a
    ``sys.meta_path`` finder; importing ``importlib.abc`` for its base class would cost
    every process that imports kmsguard)."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname not in MODULES:
            return None
        name = fullname.rpartition(".")[2]
        for entry in path or ():
            source = Path(entry) / f"{name}.py"
            if source.is_file():
                return importlib.util.spec_from_file_location(fullname, source)
        return None


def install() -> None:
    """Put the SourceFinder first, once; before any of MODULES is imported (kmsguard/__init__ does)."""
    if not any(isinstance(finder, SourceFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, SourceFinder())
