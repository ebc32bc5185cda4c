"""Only the C extension lives here; all metadata is in pyproject.toml.

The extension (the healer's hot loop) is optional at build time: a user pod that only runs
`envctl request ...`/`envctl status` has no compiler, and its install must still succeed
(`heal`/`check` then say in one line that they need the extension). Installs that run the
healer (`make`, `make install`, the Containerfile) set ENVCTL_REQUIRE_EXTENSION=1, so a
missing compiler fails them loudly instead of producing a daemon that cannot heal.
"""

import os

from setuptools import Extension, setup

REQUIRED = os.environ.get("ENVCTL_REQUIRE_EXTENSION", "") not in ("", "0")

setup(ext_modules=[Extension("envctl_shared.heal._fastfs", ["daemon/envctl_shared/heal/_fastfs.c"],
                             optional=not REQUIRED,
                             extra_compile_args=["-O2", "-Wall", "-Wextra",
                                                 "-Wno-unused-parameter",
                                                 "-Wno-missing-field-initializers"])])
