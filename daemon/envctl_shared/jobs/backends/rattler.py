"""The ``rattler`` backend: py-rattler solves and installs, in a child process (a trusted step).

Why a child process: ``rattler.solve``/``install`` run native code that cannot be interrupted
from Python; a separate process (``rattler_child``) can be killed with its group on cancel or
timeout. It is a *trusted* step (``Step.trusted``): it runs as the daemon, since it writes the
shared package cache, but in the build's cgroup and mount namespace; it never runs package code
(no link scripts) nor the env's interpreter. The child installs into the version's directory,
the path the version keeps: the prefix baked into every file with a prefix placeholder is the
one it runs at.
``pip:`` entries are refused (rattler installs conda packages only): use the venv backend.
"""

from __future__ import annotations

import json
import platform
import sys

from ...config import RequestsConfig
from ...errors import ValidationError
from ..spec import EnvSpec
from . import BuildContext, Step

BUILD_FILE = "build.json"


def default_platforms() -> list[str]:
    machine = {"x86_64": "64", "aarch64": "aarch64", "ppc64le": "ppc64le"}
    return [f"linux-{machine.get(platform.machine(), platform.machine())}", "noarch"]


class RattlerBackend:
    """Solve + install with py-rattler into the version's prefix."""

    name = "rattler"

    def check(self, spec: EnvSpec, cfg: RequestsConfig) -> None:
        if spec.pip:
            raise ValidationError("the rattler backend does not install pip: entries",
                                  hint="use --backend venv, or list conda packages only")
        if not spec.conda:
            raise ValidationError("spec lists no conda packages for the rattler backend",
                                  hint="list packages under dependencies:, or request an empty "
                                  "environment with --backend venv")

    def files(self, spec: EnvSpec, cfg: RequestsConfig) -> dict[str, str]:
        build = {"channels": list(spec.channels), "specs": list(spec.conda),
                 "platforms": list(cfg.platforms) or default_platforms(),
                 "variables": dict(spec.variables)}
        return {BUILD_FILE: json.dumps(build, indent=2) + "\n"}

    def steps(self, ctx: BuildContext) -> list[Step]:
        return [Step("solving", (
            sys.executable, "-m", "envctl_shared.jobs.backends.rattler_child",
            "--build", str(ctx.job_dir / BUILD_FILE), "--prefix", str(ctx.prefix),
            "--cache-dir", str(ctx.cache_dir)), trusted=True)]
