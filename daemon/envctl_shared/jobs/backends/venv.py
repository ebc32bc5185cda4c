"""The ``venv`` backend: ``python -m venv`` + pip, for sites without conda.

Decisions: conda dependencies are refused, except bare ``python`` and ``pip`` (the venv has both,
from ``requests.venv_python``); everything else must be in the ``pip:`` list, which pip installs
from a requirements file with the admin's ``requests.pip_args`` (e.g. ``--no-index
--find-links /srv/wheelhouse``) in front. Not relocatable (scripts carry absolute shebangs): built
at the version's own path, where it runs.
"""

from __future__ import annotations

from ...config import RequestsConfig
from ...errors import ValidationError
from ..spec import EnvSpec
from . import BuildContext, Step

REQUIREMENTS = "requirements.txt"
_IMPLIED = ("python", "pip")


class VenvBackend:
    """A stdlib venv plus pip requirements."""

    name = "venv"

    def check(self, spec: EnvSpec, cfg: RequestsConfig) -> None:
        extra = [dep for dep in spec.conda if dep not in _IMPLIED]
        if extra:
            raise ValidationError(
                f"the venv backend cannot install conda package {extra[0]!r}",
                hint="put Python packages under 'dependencies: - pip: [...]', or use a conda "
                     "backend (python and pip alone are fine: the venv provides them)")
        if not spec.pip:
            raise ValidationError("spec lists no pip: packages for the venv backend",
                                  hint="add 'dependencies: - pip: [name, ...]'")

    def files(self, spec: EnvSpec, cfg: RequestsConfig) -> dict[str, str]:
        return {REQUIREMENTS: "".join(f"{req}\n" for req in spec.pip)}

    def steps(self, ctx: BuildContext) -> list[Step]:
        prefix = str(ctx.prefix)
        return [
            Step("creating", (ctx.cfg.venv_python, "-m", "venv", prefix)),
            Step("installing", (f"{prefix}/bin/python", "-m", "pip", "install", "--no-input",
                                "--disable-pip-version-check", *ctx.cfg.pip_args,
                                "-r", str(ctx.job_dir / REQUIREMENTS))),
        ]
