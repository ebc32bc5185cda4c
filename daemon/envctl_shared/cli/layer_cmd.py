"""``envctl env layer NAME``: a personal environment on top of a shared one, where pip works.

Why: a shared version is read-only (frozen), so ``pip install`` into it is "Permission denied";
and it should be, since everyone runs it. The guide's answer for one user's extra packages is a
venv with ``--system-site-packages`` over the shared env: the user's packages go into the
layer, everything else is imported from the shared env. The CLI makes it as the user, alone
(no daemon, no privilege), in a few tens of milliseconds.

How it stays on top of the shared env, and follows it:

- the layer's interpreter is the shared env's STABLE path: ``bin/python`` is a symlink to
  ``<root>/NAME/bin/python`` (never to the version it points to now), and for a conda prefix
  ``pyvenv.cfg`` ``home`` is ``<root>/NAME/bin``, so the base prefix (and its site-packages) is
  found through ``<root>/NAME`` at every start: an update or rollback of the shared env is what
  the next start of the layer runs. (A running process keeps whatever it has imported.)
- a shared env that is itself a venv cannot be a venv's base (venvs do not nest: ``home`` would
  name ITS base interpreter, and its packages would be lost). The layer then has that base as
  ``home``, and a ``.pth`` file that adds ``<root>/NAME/lib/pythonX.Y/site-packages`` (with
  ``site.addsitedir``, so the shared env's own ``.pth`` files work) after the layer's own.
- ``bin/pip`` is a small shim for ``bin/python -m pip``: pip is imported from the shared env
  (or, when it has none, bootstrapped into the layer by ``ensurepip`` at first use) and
  installs into the layer, its ``sys.prefix``; a package of the shared env is shadowed by a
  newer one in the layer, never touched.
- the venv is created by the shared env's own interpreter (``-I -S -m venv --without-pip``: it
  knows its own version and paths; no site, no ``.pth`` of the env runs), as the user.

Where: ``~/.local/share/envctl/layers/NAME`` (``$XDG_DATA_HOME`` respected), or on a
JupyterHub (``JUPYTERHUB_USER`` set) ``.../layers/@HUBUSER/NAME``: hub users who share one uid
often share a HOME too, and must not share layers (nothing but this keeps them apart — on one
uid, the kernel cannot). The kernelspec goes to the user's Jupyter data directory (the rule of
``jupyter --data-dir``), named per env and hub user, shown as "NAME (my layer)". Running the
command again on an existing layer re-points it (after the shared env's Python changed, say)
and keeps what was installed in it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import stat
import subprocess
import time
from pathlib import Path
from typing import Any

from ..errors import EX_OK, EnvctlError, FilesystemError, UsageError, ValidationError
from .output import emit_json, quote_name
from .status_cmd import add_socket_option, client_for

HUB_USER_ENV = "JUPYTERHUB_USER"
MARKER = "envctl-layer"  # the pyvenv.cfg key that says which shared env a layer is over
PTH = "_envctl_shared.pth"
TIMEOUT = 60.0
# What the layer's python says about itself, in one start: its version, whether it can import
# pip and ipykernel (find_spec: located, not run).
_PROBE = ("import importlib.util as u, json, sys; print(json.dumps({'version': "
          "'%d.%d' % sys.version_info[:2], 'pip': bool(u.find_spec('pip')), "
          "'ipykernel': bool(u.find_spec('ipykernel'))}))")
# The kernel's launcher: the layer's and the shared env's bin first on PATH, as activation
# would; no braces (jupyter_client substitutes {name} patterns in argv).
_LAUNCH = ('export VIRTUAL_ENV="$1" PATH="$1/bin:$2/bin:$PATH"\n'
           'exec "$1/bin/python" -m ipykernel_launcher -f "$3"\n')


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("layer", help="your own environment on top of a shared one, where "
                       "'pip install' works", description="Make (or re-point) a venv over "
                       "the shared environment NAME, as you: it sees NAME's packages, follows "
                       "its updates and rollbacks, and takes yours ('LAYER/bin/pip install "
                       "PKG'); with a Jupyter kernel 'NAME (my layer)' when ipykernel is there.")
    p.add_argument("name", help="the shared environment: its name, or its path <root>/NAME")
    p.add_argument("--prefix", metavar="DIR", help="where to make the layer (default: "
                   "~/.local/share/envctl/layers/NAME, per hub user on JupyterHub)")
    p.add_argument("--root", metavar="DIR", help="the shared root holding NAME (default: "
                   "ask the daemon)")
    p.add_argument("--kernel", action=argparse.BooleanOptionalAction, default=None,
                   help="write (or with --no-kernel remove) the layer's Jupyter kernel "
                        "(default: when ipykernel can be imported)")
    p.add_argument("--json", action="store_true", help="print what was made as JSON")
    add_socket_option(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..jobs.spec import validate_name  # not at import: the jobs layer costs every command

    if os.geteuid() == 0:
        raise UsageError("env layer runs the shared environment's python as you: not as root",
                         hint="run it as the user who will use the layer")
    started = time.monotonic()
    env = _shared_env(args)
    name = validate_name(env.name)
    hub_user = _hub_user()
    dest = Path(os.path.abspath(args.prefix)) if args.prefix else _default_dir(name, hub_user)
    refreshed = _check_dest(dest, env)
    _make(env, dest)
    probe = _probe(dest)
    kernel = _kernel(args.kernel, probe, name, env, dest, hub_user)
    out = {"name": name, "env": str(env), "prefix": str(dest), "python": probe["version"],
           "home": _cfg(dest)["home"], "pip": probe["pip"], "kernel": kernel,
           "refreshed": refreshed, "seconds": round(time.monotonic() - started, 3)}
    if args.json:
        emit_json(out)
        return EX_OK
    print(f"layer over {quote_name(str(env))} {'re-pointed' if refreshed else 'made'} in "
          f"{out['seconds']:.2f}s: {quote_name(str(dest))}")
    print(f"  install into it:  {quote_name(str(dest / 'bin' / 'pip'))} install PKG"
          + ("" if probe["pip"] else "  (pip is set up in the layer at first use)"))
    print(f"  use it:           source {quote_name(str(dest / 'bin' / 'activate'))}")
    if kernel:
        print(f"  Jupyter kernel:   {kernel['display_name']} ({kernel['name']})")
    return EX_OK


# -- what to layer over, and where --------------------------------------------------------------


def _shared_env(args: argparse.Namespace) -> Path:
    """The shared env's stable path, not resolved: a path as given, ``--root``/NAME, or the
    prefix the daemon reports for NAME."""
    from ..jobs.spec import validate_name

    if "/" in args.name:
        env = Path(os.path.abspath(args.name))
    elif args.root:
        env = Path(os.path.abspath(args.root)) / validate_name(args.name)
    else:
        with client_for(args) as client:
            env = Path(client.call("env-show", name=validate_name(args.name))["prefix"])
    if ".envctl" in env.parts:
        raise ValidationError(f"{quote_name(str(env))} is one version of an environment: a "
                              "layer over it would not follow updates",
                              hint="name the environment's stable path, <root>/NAME")
    if not os.path.exists(env / "bin" / "python"):
        raise FilesystemError(f"{quote_name(str(env))} has no bin/python: not a Python "
                              "environment, or not reachable from here",
                              hint="see: envctl env list")
    return env


def _hub_user() -> str | None:
    user = os.environ.get(HUB_USER_ENV) or None
    if user is not None and ("/" in user or user in (".", "..") or not user.isprintable()):
        raise UsageError(f"{HUB_USER_ENV}={user!r} cannot name a directory",
                         hint="give the layer's place with --prefix DIR")
    return user


def _data_home() -> Path:
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")


def _default_dir(name: str, hub_user: str | None) -> Path:
    base = _data_home() / "envctl" / "layers"
    return base / f"@{hub_user}" / name if hub_user else base / name


def _cfg(prefix: Path) -> dict[str, str]:
    """``pyvenv.cfg`` as venv writes it (``key = value`` lines); {} when there is none."""
    try:
        lines = (prefix / "pyvenv.cfg").read_text(encoding="utf-8").splitlines()
    except (FileNotFoundError, NotADirectoryError):
        return {}
    except OSError as exc:
        raise FilesystemError(f"cannot read {quote_name(str(prefix / 'pyvenv.cfg'))}: "
                              f"{exc.strerror}", hint="see: envctl doctor") from None
    return {k.strip(): v.strip() for k, sep, v in (line.partition("=") for line in lines) if sep}


def _check_dest(dest: Path, env: Path) -> bool:
    """True for an existing layer over ``env`` (re-pointed, its packages kept); a missing or
    empty directory is made; anything else is refused, untouched. A layer runs from its
    directory at every start, so whoever may replace what is in it chooses what you run: it
    must be a directory of yours (not a symlink, which another may have planted in /tmp), held
    by a directory of yours or root's that nobody else may rename it out of (``_check_holder``)."""
    try:
        st: os.stat_result | None = os.lstat(dest)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise FilesystemError(f"cannot look at {quote_name(str(dest))}: {exc.strerror}",
                              hint="give a directory of yours with --prefix") from None
    if st is not None and (not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid()):
        what = "a symlink" if stat.S_ISLNK(st.st_mode) else \
            "not a directory" if not stat.S_ISDIR(st.st_mode) else f"owned by uid {st.st_uid}"
        raise FilesystemError(f"{quote_name(str(dest))} is {what}: a layer must be a directory "
                              "of yours (whoever can change it chooses what your layer runs)",
                              hint="give a new directory of yours with --prefix")
    over = _cfg(dest).get(MARKER)
    refreshed = over == str(env)
    if over is not None and not refreshed:
        raise ValidationError(f"{quote_name(str(dest))} is a layer over {quote_name(over)}",
                              hint="give another --prefix, or remove that layer first")
    if not refreshed and st is not None and any(dest.iterdir()):
        raise FilesystemError(f"{quote_name(str(dest))} exists and is not a layer",
                              hint="give an empty or new directory with --prefix")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise FilesystemError(f"cannot make {quote_name(str(dest.parent))}: {exc.strerror}",
                              hint="give a writable directory with --prefix") from None
    _check_holder(dest.parent)
    return refreshed


def _check_holder(parent: Path) -> None:
    """The directory holding a layer: yours or root's, and sticky when others may write it
    (as /tmp): else its owner, or those who may write it, could swap the layer for theirs.
    A group that is your own primary group (a user private group, umask 002) is you."""
    st = os.stat(parent)
    others = st.st_mode & 0o002 or st.st_mode & 0o020 and st.st_gid != os.getegid()
    writable = others and not st.st_mode & stat.S_ISVTX
    if st.st_uid not in (os.geteuid(), 0) or writable:
        who = f"owned by uid {st.st_uid}" if st.st_uid not in (os.geteuid(), 0) else \
            "writable by others (and not sticky)"
        raise FilesystemError(f"{quote_name(str(parent))} is {who}: whoever can rename "
                              "entries in it could swap your layer for theirs",
                              hint="give a --prefix in a directory of yours")


# -- making it ----------------------------------------------------------------------------------


_RUN_HINT = "the shared environment's python must run for you; see: envctl doctor NAME"


def _run(argv: list[str], what: str) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT, check=False,
                              stdin=subprocess.DEVNULL, cwd="/")
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EnvctlError(f"{what}: {exc}", hint=_RUN_HINT) from None
    if done.returncode != 0:
        tail = (done.stderr.strip() or done.stdout.strip())[-500:]
        raise EnvctlError(f"{what}: exit {done.returncode}: {tail}", hint=_RUN_HINT)
    return done.stdout


def _make(env: Path, dest: Path) -> None:
    """The venv by the shared env's interpreter, then re-pointed through the stable path."""
    base = str(env / "bin" / "python")
    _run([base, "-I", "-S", "-m", "venv", "--without-pip", "--system-site-packages",
          str(dest)], f"{base} -m venv")
    shared = _cfg(env)  # a venv itself: chained by a .pth (venvs do not nest)
    cfg = _cfg(dest)
    xy = ".".join(cfg.get("version", "").split(".")[:2])  # the version the venv was made for
    cfg.update(home=shared.get("home", str(env / "bin")), executable=base,
               **{"include-system-site-packages":
                  shared.get("include-system-site-packages", "true"), MARKER: str(env)})
    _write(dest / "pyvenv.cfg", "".join(f"{k} = {v}\n" for k, v in cfg.items()))
    bindir = dest / "bin"
    for link in bindir.glob("python*"):  # venv's, to its resolved base: made anew below
        link.unlink()
    os.symlink(base, bindir / "python")  # resolved through <root>/NAME at every start
    for alias in ("python3", f"python{xy}"):
        os.symlink("python", bindir / alias)
    site = dest / "lib" / f"python{xy}" / "site-packages"
    chained = [str(p) for p in sorted(env.glob("lib/python*/site-packages"))]
    if shared and chained:
        _write(site / PTH, "".join(f"import site; site.addsitedir({p!r})\n" for p in chained))
    else:
        (site / PTH).unlink(missing_ok=True)
    python = shlex.quote(str(bindir / "python"))
    shim = ("#!/bin/sh\n# envctl env layer: pip of this layer (it installs here, never into "
            f"the shared environment)\n{python} -c 'import pip' 2>/dev/null || "
            f"{python} -m ensurepip --default-pip >&2 || exit 1\nexec {python} -m pip \"$@\"\n")
    for name in ("pip", "pip3"):
        if not (bindir / name).exists():  # pip's own script, once ensurepip put it there
            _write(bindir / name, shim, 0o755)


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    """Atomically (a reader never sees half a file), as the user (``mode`` under the umask)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


def _probe(dest: Path) -> dict[str, Any]:
    out = _run([str(dest / "bin" / "python"), "-I", "-c", _PROBE], "the layer's python")
    return dict(json.loads(out))


# -- its kernel ---------------------------------------------------------------------------------


def _jupyter_data_dir() -> Path:
    """Where ``jupyter --data-dir`` points on Linux: $JUPYTER_DATA_DIR, else
    $XDG_DATA_HOME/jupyter, else ~/.local/share/jupyter."""
    explicit = os.environ.get("JUPYTER_DATA_DIR")
    return Path(explicit) if explicit else _data_home() / "jupyter"


def layer_kernel_name(name: str, hub_user: str | None) -> str:
    """``envctl.layer-<env>`` (never a shared kernel's ``envctl-...``: those would shadow it
    on JUPYTER_PATH), per hub user on a hub (a shared HOME holds everyone's)."""
    from ..jobs.kernels import PREFIX, kernel_name

    shared = kernel_name(name)
    if shared is None:  # a name the request API could not have made: no kernel for it
        raise UsageError(f"{name!r} cannot have a kernel", hint="pass --no-kernel")
    base = f"envctl.layer-{shared.removeprefix(PREFIX)}"
    return base + (f"-{hashlib.sha256(hub_user.encode()).hexdigest()[:8]}" if hub_user else "")


def _kernel(want: bool | None, probe: dict[str, Any], name: str, env: Path, dest: Path,
            hub_user: str | None) -> dict[str, str] | None:
    """Write the layer's kernelspec (or remove it: ``--no-kernel``); its description."""
    kdir = _jupyter_data_dir() / "kernels" / layer_kernel_name(name, hub_user)
    if want is False or (want is None and not probe["ipykernel"]):
        shutil.rmtree(kdir, ignore_errors=True)
        return None
    if not probe["ipykernel"]:
        raise ValidationError(f"no ipykernel in {quote_name(str(env))} nor in the layer",
                              hint=f"install it into the layer first: "
                                   f"{quote_name(str(dest / 'bin' / 'pip'))} install ipykernel")
    display = f"{name} (my layer)" + (f" [{hub_user}]" if hub_user else "")
    spec = {"argv": ["/bin/sh", "-c", _LAUNCH, "envctl-layer", str(dest), str(env),
                     "{connection_file}"],
            "display_name": display, "language": "python",
            "metadata": {"envctl": {"layer": str(dest), "env": str(env)}}}
    try:
        kdir.mkdir(parents=True, exist_ok=True)
        _write(kdir / "kernel.json", json.dumps(spec, indent=1) + "\n")
    except OSError as exc:
        raise FilesystemError(f"cannot write the kernelspec in {quote_name(str(kdir))}: "
                              f"{exc.strerror}", hint="or make the layer with --no-kernel") \
            from None
    return {"name": kdir.name, "display_name": display, "dir": str(kdir)}
