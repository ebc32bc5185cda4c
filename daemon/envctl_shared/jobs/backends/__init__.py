"""Backends: how an environment is built, as data — the command lines a build runs.

Why "command lines as data": the runner owns everything that must be the same for every
backend (user switch, process group, log, timeout, cancel, versions, freezing, tests, the
switch of the stable path); a backend only says (1) what it refuses at submit time (``check``),
(2) which input files it needs in the job's directory (``files``) and (3) the steps to run
(``steps``), building at the path the version keeps for its whole life. That keeps each
backend small and lets the conda-family command lines be unit-tested on a machine without
conda.

A step is ``trusted`` when only code we wrote runs in it (the py-rattler child: it fetches and
links, never runs package code or the env's interpreter); every other step runs package code
(an installer asking the env's python about itself, ``.pth`` files, sdist builds, byte
compilation, tests) and runs as the build's uid. Python packages go in with uv when it is
installed (a dependency of the daemon extra: as pixi does, conda packages by rattler and PyPI
packages by uv into the same prefix), else with the env's own pip; either way the env's
interpreter then byte-compiles every site directory (``compile_step``), so a version never
needs to write into itself once it is frozen read-only (a venv holds only what its installer
put there, which compiles it as it installs).
"""

from __future__ import annotations

import importlib
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ...config import BACKENDS, RequestsConfig
from ...errors import ValidationError
from ..procs import SAFE_PATH
from ..spec import EnvSpec
from .rattler_child import PHASE_MARK as PHASE_MARK  # the runner reads it from here

PHASES = ("preparing", "solving", "downloading", "linking", "creating", "installing",
          "building", "compiling", "freezing", "testing", "finalizing")


@dataclass(frozen=True)
class Step:
    """One process of a build; ``phase`` is shown while it runs (children may refine it);
    ``trusted``: only code we wrote runs in it (see above)."""

    phase: str
    argv: tuple[str, ...]
    trusted: bool = False


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


REQUIREMENTS = "requirements.txt"  # the spec's pip: entries, one per line
# pip options uv reads with the same meaning; other requests.pip_args keep pip as the installer
_UV_OPTIONS = frozenset({"--no-index", "--find-links", "-f", "--index-url", "-i",
                         "--extra-index-url", "--pre", "--no-deps", "--only-binary",
                         "--no-binary", "--no-build-isolation", "--constraint", "-c",
                         "--require-hashes"})
# Byte-compile every site directory of the interpreter that runs it (purelib, platlib and
# site's own list: Debian's dist-packages, a venv's site-packages). A file that does not
# compile (a test fixture with Python 2 syntax) is left as it is, as conda and pip do. Workers:
# the CPUs the build may use, at most 8 (a pool forks them all at once, however few the files).
# The path baked into each .pyc is relative to the prefix (``stripdir``): import puts the real
# one back (``_imp._fix_co_filename``), and the .pyc of a file linked from the conda cache is
# then the same bytes in every version, which the store shares (not one copy per version).
_COMPILE = ("import compileall, site, sysconfig, os, sys\n"
            "dirs = {sysconfig.get_path('purelib'), sysconfig.get_path('platlib'), "
            "*site.getsitepackages()}\n"
            "workers = min(8, len(os.sched_getaffinity(0)))\n"
            "for d in sorted(x for x in dirs if os.path.isdir(x)):\n"
            "    compileall.compile_dir(d, quiet=1, workers=workers, stripdir=sys.prefix)\n"
            "    print('compiled', d, flush=True)\n")


# find_uv_bin reads sysconfig, whose first use fills its cache unlocked in Python 3.11: two
# builds starting together saw a half-filled cache (EXE None: "can only concatenate str").
_SYSCONFIG_LOCK = threading.Lock()


def uv_bin() -> str | None:
    """The uv executable, found the way the ``uv`` package finds its own (the daemon may run
    from a venv that is not on PATH), else on the safe PATH; None when uv is not installed."""
    try:
        import uv  # type: ignore[import-not-found,unused-ignore]

        with _SYSCONFIG_LOCK:
            return str(uv.find_uv_bin())
    except (ImportError, FileNotFoundError):
        return shutil.which("uv", path=SAFE_PATH)


def uv_for(cfg: RequestsConfig) -> str | None:
    """uv, when it is installed and reads every option of ``requests.pip_args`` as pip does;
    None: the env's own pip installs the ``pip:`` entries."""
    options = {arg.split("=", 1)[0] for arg in cfg.pip_args if arg.startswith("-")}
    return uv_bin() if options <= _UV_OPTIONS else None


def install_step(ctx: BuildContext, python: str, compile_bytecode: bool = False) -> Step:
    """Install the spec's ``pip:`` requirements (the job's REQUIREMENTS file) into the
    environment of ``python``, with the site's ``requests.pip_args`` in front: by uv unless uv
    is missing or the site's options are pip's own, else by that python's pip.
    ``compile_bytecode``: the installer byte-compiles what it installs (pip always does), for a
    prefix where it installs everything, so that no ``compile_step`` is needed after it.

    uv's cache is private to the step (``--no-cache``: a temporary one in TMPDIR, the job's
    HOME, removed when uv exits): a shared one would let one build poison the next, and from
    local wheels a cold uv takes 0.1 s; files are copied, never linked, into the version."""
    requirements = str(ctx.job_dir / REQUIREMENTS)
    uv = uv_for(ctx.cfg)
    if uv is not None:
        return Step("installing", (
            "/usr/bin/env", "UV_LINK_MODE=copy", "UV_PYTHON_DOWNLOADS=never", uv, "pip",
            "install", "--no-cache", *(("--compile-bytecode",) if compile_bytecode else ()),
            "--python", python, *ctx.cfg.pip_args, "-r", requirements))
    return Step("installing", (python, "-m", "pip", "install", "--no-input",
                               "--disable-pip-version-check", *ctx.cfg.pip_args,
                               "-r", requirements))


def compile_step(ctx: BuildContext) -> Step:
    """Byte-compile the env's Python files with its own interpreter, isolated (``-I``: no
    user site, no environment variables, no cwd on the path); nothing to do in an env
    without a python."""
    return Step("compiling", (
        "/bin/sh", "-c", '[ -x "$1/bin/python" ] || exit 0; exec "$1/bin/python" -I -c "$2"',
        "envctl-compile", str(ctx.prefix), _COMPILE))


# Activation for --test commands: the env's activate.d scripts (conda), then the command.
_ACTIVATE = ('for f in "$CONDA_PREFIX"/etc/conda/activate.d/*.sh; do [ -f "$f" ] && . "$f"; '
             'done; eval "$1"')


def test_step(ctx: BuildContext, name: str, command: str) -> Step:
    """A ``--test`` command run inside the new version as if it were activated: its ``bin``
    first on PATH, CONDA_PREFIX (or VIRTUAL_ENV for a venv) set, the spec's ``variables:``
    exported, activate.d scripts sourced."""
    prefix = str(ctx.prefix)
    where = (f"VIRTUAL_ENV={prefix}" if (ctx.prefix / "pyvenv.cfg").exists()
             else f"CONDA_PREFIX={prefix}")
    variables = (f"{key}={value}" for key, value in ctx.spec.variables)
    return Step("testing", ("/usr/bin/env", *variables, f"PATH={prefix}/bin:{SAFE_PATH}", where,
                            f"CONDA_DEFAULT_ENV={name}", "/bin/sh", "-c", _ACTIVATE,
                            "envctl-test", command))


def backend_named(name: str) -> Backend:
    """The backend implementation called ``name``, allowed or not (recovery needs it): the
    module ``config.BACKENDS`` names for it, imported only when a build needs it."""
    if name not in BACKENDS:
        raise ValidationError(f"unknown backend {name!r}")
    module = importlib.import_module(f"{__name__}.{BACKENDS[name]}")
    backend: Backend = module.BACKEND(name)
    return backend


def get_backend(name: str, cfg: RequestsConfig) -> Backend:
    """The backend called ``name``, if this daemon allows it."""
    if name not in cfg.allowed_backends:
        raise ValidationError(f"backend {name!r} is not allowed on this daemon",
                              hint=f"allowed: {', '.join(cfg.allowed_backends)}")
    return backend_named(name)
