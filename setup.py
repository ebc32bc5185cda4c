"""Only the C extension lives here; all metadata is in pyproject.toml."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("envctl_shared.heal._fastfs", ["daemon/envctl_shared/heal/_fastfs.c"],
                             extra_compile_args=["-O2", "-Wall", "-Wextra",
                                                 "-Wno-unused-parameter",
                                                 "-Wno-missing-field-initializers"])])
