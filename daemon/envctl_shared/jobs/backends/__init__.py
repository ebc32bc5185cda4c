"""Backends: how an environment is built, as data — the command lines a build runs.

Why "command lines as data": the runner owns everything that must be the same for every
backend (user switch, process group, log, timeout, cancel, versions, freezing, tests, the
switch of the stable path); a backend only says (1) what it refuses at submit time (``check``),
(2) which input files it needs in the job's directory (``files``) and (3) the steps to run
(``steps``), building at the path the version keeps for its whole life. That keeps each
backend small and lets the conda-family command lines be unit-tested on a machine without
conda.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ...config import RequestsConfig
from ...errors import ValidationError
from ..procs import SAFE_PATH
from ..spec import EnvSpec

PHASES = ("preparing", "solving", "downloading", "linking", "creating", "installing",
          "building", "freezing", "testing", "finalizing")
PHASE_MARK = "ENVCTL-PHASE "  # a child prints "ENVCTL-PHASE linking" on its stdout


@dataclass(frozen=True)
class Step:
    """One process of a build; ``phase`` is shown while it runs (children may refine it)."""

    phase: str
    argv: tuple[str, ...]


@dataclass(frozen=True)
class BuildContext:
    """Where a build happens. ``prefix`` is the version's directory: where it installs and the
    path it runs at (a version is built where it stays); ``job_dir`` holds the daemon-written
    inputs (read-only to the build user); ``home`` is the build's writable HOME."""

    spec: EnvSpec
    cfg: RequestsConfig
    job_dir: Path
    home: Path
    prefix: Path
    cache_dir: Path


class Backend(Protocol):
    """What every backend module provides (as a class with these members)."""

    name: str

    def check(self, spec: EnvSpec, cfg: RequestsConfig) -> None:
        """Refuse (ValidationError) a spec this backend cannot build."""

    def files(self, spec: EnvSpec, cfg: RequestsConfig) -> dict[str, str]:
        """Inputs to write: job-dir-relative names (``home/x`` lands in the writable HOME)."""

    def steps(self, ctx: BuildContext) -> list[Step]:
        """The processes to run, in order."""


# Activation for --test commands: the env's activate.d scripts (conda), then the command.
_ACTIVATE = ('for f in "$CONDA_PREFIX"/etc/conda/activate.d/*.sh; do [ -f "$f" ] && . "$f"; '
             'done; eval "$1"')


def test_step(ctx: BuildContext, name: str, command: str) -> Step:
    """A ``--test`` command run inside the new version as if it were activated: its ``bin``
    first on PATH, CONDA_PREFIX (or VIRTUAL_ENV for a venv) set, activate.d scripts sourced."""
    prefix = str(ctx.prefix)
    where = (f"VIRTUAL_ENV={prefix}" if (ctx.prefix / "pyvenv.cfg").exists()
             else f"CONDA_PREFIX={prefix}")
    return Step("testing", ("/usr/bin/env", f"PATH={prefix}/bin:{SAFE_PATH}", where,
                            f"CONDA_DEFAULT_ENV={name}", "/bin/sh", "-c", _ACTIVATE,
                            "envctl-test", command))


def backend_named(name: str) -> Backend:
    """The backend implementation called ``name``, allowed or not (recovery needs it)."""
    from . import conda, rattler, venv

    if name == "rattler":
        return rattler.RattlerBackend()
    if name == "venv":
        return venv.VenvBackend()
    if name in ("conda", "mamba", "micromamba"):
        return conda.CondaBackend(name)
    raise ValidationError(f"unknown backend {name!r}")


def get_backend(name: str, cfg: RequestsConfig) -> Backend:
    """The backend called ``name``, if this daemon allows it."""
    if name not in cfg.allowed_backends:
        raise ValidationError(f"backend {name!r} is not allowed on this daemon",
                              hint=f"allowed: {', '.join(cfg.allowed_backends)}")
    return backend_named(name)
