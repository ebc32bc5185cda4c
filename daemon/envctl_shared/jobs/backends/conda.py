"""The ``conda``, ``mamba`` and ``micromamba`` backends: the site's own executable.

The daemon writes a normalised environment.yml (the validated channels plus ``nodefaults``, so a
``.condarc`` cannot add channels the policy did not allow; no ``name``/``prefix``) into the
build's HOME — conda writes a pip requirements file next to it, so that directory must be
writable by the build user — and runs ``<conda_exe> env create --prefix FINAL --file FILE``
(micromamba: ``create``) with the version's own path as the prefix (not relocatable: it runs
where it is built). No conda is installable on the test machines: the command lines are
unit-tested.
"""

from __future__ import annotations

import yaml

from ...config import RequestsConfig
from ...errors import ConfigError
from ..spec import EnvSpec
from . import BuildContext, Step

SPEC_FILE = "home/environment.yml"


class CondaBackend:
    """conda-style CLIs; ``flavour`` picks the sub-command spelling."""


    def __init__(self, flavour: str) -> None:
        self.name = flavour

    def check(self, spec: EnvSpec, cfg: RequestsConfig) -> None:
        if not cfg.conda_exe:
            raise ConfigError(f"requests.conda_exe is not set; the {self.name} backend needs it")

    def files(self, spec: EnvSpec, cfg: RequestsConfig) -> dict[str, str]:
        deps: list[object] = list(spec.conda)
        if spec.pip:
            deps.append({"pip": list(spec.pip)})
        doc: dict[str, object] = {"channels": [*spec.channels, "nodefaults"],
                                  "dependencies": deps}
        if spec.variables:  # conda env create writes them to conda-meta/state itself
            doc["variables"] = dict(spec.variables)
        return {SPEC_FILE: yaml.safe_dump(doc, sort_keys=False)}

    def steps(self, ctx: BuildContext) -> list[Step]:
        exe = ctx.cfg.conda_exe or self.name
        spec_file = str(ctx.job_dir / SPEC_FILE)
        prefix = str(ctx.prefix)
        args: tuple[str, ...]
        if self.name == "micromamba":
            args = ("create", "--yes", "--prefix", prefix, "--file", spec_file)
        elif self.name == "mamba":
            args = ("env", "create", "--yes", "--prefix", prefix, "--file", spec_file)
        else:
            args = ("env", "create", "--prefix", prefix, "--file", spec_file)
        return [Step("building", (exe, *args))]


BACKEND = CondaBackend  # what ``backend_named`` makes (see ``config.BACKENDS``)
