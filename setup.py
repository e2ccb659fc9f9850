"""Compiles kmsguard's per-message hot path with Cython (see src/kmsguard/fastpath.py).

Everything else is in pyproject.toml. The extensions are optional: without a C
compiler the same modules run as plain Python (``kmsguard.fastpath.COMPILED`` is then
False), slower but identical in behaviour.
"""

from Cython.Build import cythonize
from setuptools import Extension, setup

MODULES = ("kmsguard.fastpath", "kmsguard.nonces")

setup(
    ext_modules=cythonize(
        [Extension(name, [f"src/{name.replace('.', '/')}.py"], optional=True) for name in MODULES],
        compiler_directives={"language_level": "3", "annotation_typing": False},
    )
)
