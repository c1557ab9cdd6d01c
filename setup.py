"""Build the compiled fastpath twin with Cython, unless GATE_PUREPYTHON=1.

The pure twin (fastpath/_pure.py) is always installed; the selector module
(fastpath/__init__.py) picks the compiled one when it imports. The Cython
directives live here and only here (none in the .pyx), so every build of the
twin (make build, the Debian package, the arm64 root) compiles it the same way.
"""
import os

from setuptools import setup

ext_modules = []
if os.environ.get("GATE_PUREPYTHON", "") not in ("1", "true", "yes"):
    from Cython.Build import cythonize
    from setuptools import Extension

    ext_modules = cythonize(
        [Extension("fastpath._compiled", ["fastpath/_compiled.pyx"], extra_compile_args=["-O2"])],
        compiler_directives={
            "language_level": "3",
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
        },
    )

setup(ext_modules=ext_modules)
