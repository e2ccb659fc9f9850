"""Compiles kmsguard's per-message hot path with Cython (see src/kmsguard/fastpath.py and plans.py).

Everything else is in pyproject.toml. The extensions are optional: without a C
compiler the same modules run as plain Python (``kmsguard.fastpath.COMPILED`` is then
False), slower but identical in behaviour.
"""

from Cython.Build import cythonize
from setuptools import Extension, setup

MODULES = ("kmsguard.fastpath", "kmsguard.plans", "kmsguard.nonces", "kmsguard.histogram", "kmsguard.audit.frames")

EXTENSIONS = cythonize(
    [Extension(name, [f"src/{name.replace('.', '/')}.py"]) for name in MODULES],
    # Types come from the .pxd files, not from annotations (which are for mypy). Index
    # checks are the code's own (Frames.attach, Histogram's bounds, plans._prefix_len's
    # length checks), so Cython's are off.
    include_path=["src"],  # where the .pxd files cimport one another from
    compiler_directives={
        "language_level": "3",
        "annotation_typing": False,
        "boundscheck": False,
        "wraparound": False,
        # No generated __reduce__: a Budget holds a key object, and nothing here is
        # meant to be pickled (as plain Python classes they are not picklable either).
        "auto_pickle": False,
    },
)
# Optional: where one does not compile (no C compiler), the install goes on without it. Set
# on what cythonize returns, which does not carry the flag over from the Extensions given.
for extension in EXTENSIONS:
    extension.optional = True

setup(ext_modules=EXTENSIONS)
