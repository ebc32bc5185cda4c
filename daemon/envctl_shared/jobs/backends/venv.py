"""The ``venv`` backend: a stdlib venv of the base interpreter + the ``pip:`` entries, by uv.

Decisions: conda dependencies are refused, except bare ``python`` and ``pip``; everything else
must be in the ``pip:`` list, installed from a requirements file with the admin's
``requests.pip_args`` (e.g. ``--no-index --find-links /srv/wheelhouse``) in front, by uv when it
is installed, else by the venv's pip (``install_step``). The venv itself is made by the base
interpreter (``python -m venv``: its own layout, Debian's or conda-forge's, in 0.03 s) without
pip — pip is seeded (``ensurepip``, from the wheel the base python bundles: offline, 2 s) only
when the spec lists ``pip`` or when uv is missing and pip must do the installing. The
installer byte-compiles what it installs (uv ``--compile-bytecode``; pip by default). Not
relocatable (scripts carry absolute shebangs): built at the version's own path, where it runs.
An empty ``pip:`` list is an empty venv. ``variables:`` are refused: a venv's activate script
has no place for them.

The base interpreter, which a venv runs for life (``pyvenv.cfg`` ``home``), is
``requests.venv_python``, or with ``requests.venv_base`` a Python env the daemon keeps in the
root (``jobs.base_python``): then the job's inputs also hold the rattler ``build.json`` of that
base, which the runner builds the first time a venv needs it and passes in as ``venv_python``.
"""

from __future__ import annotations

from ...config import RequestsConfig
from ...errors import ValidationError
from ..base_python import build_file
from ..spec import EnvSpec
from . import REQUIREMENTS, BuildContext, Step, install_step, rattler

_IMPLIED = ("python", "pip")


class VenvBackend:
    """A stdlib venv plus pip requirements."""

    def __init__(self, name: str = "venv") -> None:
        self.name = name

    def check(self, spec: EnvSpec, cfg: RequestsConfig) -> None:
        extra = [dep for dep in spec.conda if dep not in _IMPLIED]
        if extra:
            raise ValidationError(
                f"the venv backend cannot install conda package {extra[0]!r}",
                hint="put Python packages under 'dependencies: - pip: [...]', or use a conda "
                     "backend (python and pip alone are fine: the venv provides them)")
        if spec.variables:
            raise ValidationError("the venv backend cannot set activation variables",
                                  hint="leave variables: out, or use a conda backend")

    def files(self, spec: EnvSpec, cfg: RequestsConfig) -> dict[str, str]:
        files = {REQUIREMENTS: "".join(f"{req}\n" for req in spec.pip)}
        if cfg.venv_base is not None:
            files[rattler.BUILD_FILE] = build_file(cfg)
        return files

    def steps(self, ctx: BuildContext) -> list[Step]:
        prefix = str(ctx.prefix)
        python = f"{prefix}/bin/python"
        install = install_step(ctx, python, compile_bytecode=True) if ctx.spec.pip else None
        pip = "pip" in ctx.spec.conda or (install is not None and install.argv[0] == python)
        steps = [Step("creating", (ctx.cfg.venv_python, "-m", "venv",
                                   *(() if pip else ("--without-pip",)), prefix))]
        if install is not None:  # none: an empty venv
            steps.append(install)
        return steps


BACKEND = VenvBackend  # what ``backend_named`` makes (see ``config.BACKENDS``)
