"""Build the one C extension: atomics and frame views (see src/xengrant/_cext.c)."""
from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "xengrant._cext",
            sources=["src/xengrant/_cext.c"],
            depends=["src/xengrant/_ring.c"],
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
