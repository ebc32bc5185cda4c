"""The ``rattler`` backend: conda packages by py-rattler, then the ``pip:`` entries by uv.

Why a child process for rattler: ``rattler.solve``/``install`` run native code that cannot be
interrupted from Python; a separate process (``rattler_child``) can be killed with its group on
cancel or timeout. It is the one *trusted* step (``Step.trusted``): it runs as the daemon, since
it writes the shared package cache, but in the build's cgroup and mount namespace; it never runs
package code (no link scripts) nor the env's interpreter. It installs into the version's
directory, the path the version keeps: the prefix baked into every file with a prefix
placeholder is the one it runs at.
``pip:`` entries then go into the same prefix, for the env's own interpreter, as pixi does
(``install_step``, as the build's uid): so a spec with a ``pip:`` section must list python among
its conda packages, and pip too where pip rather than uv installs (refused at submit time
otherwise, not after a solve).
An unchanged ``--replace`` makes no new version (``unchanged_if``): what ``conda update`` says
when the solve gives what is installed, and what an admin re-running the same request expects.
"""

from __future__ import annotations

import json
import platform
import re
import sys
from typing import Any

from ...config import RequestsConfig
from ...errors import ValidationError
from ..spec import EnvSpec, conda_names
from . import REQUIREMENTS, BuildContext, Step, compile_step, install_step, rattler_child, uv_for

BUILD_FILE = "build.json"
# "name==version" and nothing else: the one pip entry whose install is known without resolving
_PIN_RE = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([A-Za-z0-9.+!_-]+)")


def default_platforms() -> list[str]:
    machine = {"x86_64": "64", "aarch64": "aarch64", "ppc64le": "ppc64le"}
    return [f"linux-{machine.get(platform.machine(), platform.machine())}", "noarch"]


class RattlerBackend:
    """Solve + install with py-rattler into the version's prefix; pip entries with uv."""

    def __init__(self, name: str = "rattler") -> None:
        self.name = name

    def check(self, spec: EnvSpec, cfg: RequestsConfig) -> None:
        if not spec.conda:
            raise ValidationError("spec lists no conda packages for the rattler backend",
                                  hint="list packages under dependencies:" + (
                                      ", or request an empty environment with --backend venv"
                                      if "venv" in cfg.allowed_backends else ""))
        if not spec.pip:
            return
        names = conda_names(spec)
        if "python" not in names:
            raise ValidationError(
                "spec: the pip: section needs a python in the environment, and dependencies: "
                "lists none", hint="add python to dependencies: (e.g. - python=3.11)")
        if "pip" not in names and uv_for(cfg) is None:
            raise ValidationError(
                "spec: the pip: section needs pip in the environment on this daemon (it "
                "installs pip: entries with the env's own pip), and dependencies: lists none",
                hint="add pip to dependencies:")

    def files(self, spec: EnvSpec, cfg: RequestsConfig) -> dict[str, str]:
        build = {"channels": list(spec.channels), "specs": list(spec.conda),
                 "platforms": list(cfg.platforms) or default_platforms(),
                 "variables": dict(spec.variables)}
        files = {BUILD_FILE: json.dumps(build, indent=2) + "\n"}
        if spec.pip:
            files[REQUIREMENTS] = "".join(f"{req}\n" for req in spec.pip)
        return files

    def steps(self, ctx: BuildContext) -> list[Step]:
        steps = [Step("solving", (
            sys.executable, "-I", rattler_child.__file__,
            "--build", str(ctx.job_dir / BUILD_FILE), "--prefix", str(ctx.prefix),
            "--cache-dir", str(ctx.cache_dir)), trusted=True)]
        if ctx.spec.pip:
            steps.append(install_step(ctx, f"{ctx.prefix}/bin/python"))
        return [*steps, compile_step(ctx)]


def _pip_name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()  # PEP 503


def unchanged_if(record: dict[str, Any] | None, spec: EnvSpec, spec_text: str
                 ) -> dict[str, str]:
    """The job file (``rattler_child.CURRENT_FILE``) that lets the trusted step end a
    ``--replace`` with no new version when its solve gives exactly the conda packages (name,
    version, build, channel) of the current version ``record``; empty when that would not
    mean "nothing changes": the version was not built ready by this backend from this very
    spec text, or a pip: entry is not an exact ``name==version`` pin, or the pins are not
    exactly the pip packages the version holds (an unpinned entry may resolve anew)."""
    if not record or record.get("state") != "ready" or record.get("backend") != "rattler" \
            or not record.get("digest") or record.get("spec") != spec_text:
        return {}
    packages = [p for p in record.get("packages") or [] if isinstance(p, dict)]
    pins = [_PIN_RE.fullmatch(entry.strip()) for entry in spec.pip]
    have = {(_pip_name(p["name"]), p["version"]) for p in packages if p.get("manager") == "pip"}
    if not all(pins) or {(_pip_name(m[1]), m[2]) for m in pins if m} != have:
        return {}
    conda = sorted([p["name"].lower(), p["version"], p["build"], p["channel"]] for p in packages
                   if p.get("manager") == "conda")
    return {rattler_child.CURRENT_FILE: json.dumps(
        {"version": record.get("version"), "packages": conda}) + "\n"}


BACKEND = RattlerBackend  # what ``backend_named`` makes (see ``config.BACKENDS``)
