"""Build the one C extension, xengrant._cext (src/xengrant/_cext.c says which file is what)."""
from glob import glob

from setuptools import Extension, setup

#: Every C file of the package, one concept each, compiled into the one module (as
#: scripts/test-sanitizers.sh and xenlab/build-payload.sh compile src/xengrant/*.c).
C_SOURCES = sorted(glob("src/xengrant/*.c"))

setup(
    ext_modules=[
        Extension(
            "xengrant._cext",
            sources=C_SOURCES,
            depends=["src/xengrant/_cext.h"],
            # -Werror=implicit-function-declaration: a C API newer than the oldest
            # Python claimed (requires-python) fails the build, not the import.
            extra_compile_args=[
                "-O2",
                "-std=c11",
                "-Wall",
                "-Wextra",
                "-Wno-missing-field-initializers",
                "-Werror=implicit-function-declaration",
            ],
        )
    ]
)
