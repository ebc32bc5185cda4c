"""The venvs' base Python, kept by the daemon in the root: ``<root>/.envctl/base/python-<key>``.

Why: a venv runs its base interpreter for life (``pyvenv.cfg`` ``home``; its ``bin/python`` is
a symlink to it). The daemon's own ``/usr/bin/python3`` is not there for other hosts and user
pods mounting the root (on Kubernetes, user images have their own Python, or another version).
With ``requests.venv_base`` the daemon builds a Python env with rattler, from the admin's match
specs and channels, inside the root, and every venv is created by that env's ``bin/python3``:
whoever can read the root can run every venv in it.

Decisions:

- **Content-addressed, never changed in place.** ``<key>`` is a hash of the dependencies,
  channels and platforms. A base, once ready, is used as it is by every later venv build with
  the same ``venv_base``; editing ``venv_base`` (a new pin, another channel) is the deliberate
  update and builds a new base beside the old one. Venvs built before keep running theirs.
- **Never removed by the daemon.** Env GC does not look into ``.envctl/base``: a base is the
  ``home`` of venv versions that may live for months (every version kept, rolled back to, or
  running a kernel). An admin removes a base once no ``pyvenv.cfg`` under ``.envctl/envs``
  names it as ``home`` (``docs/environments.md`` shows the check).
- **Built like an env version** by the first venv job that needs it, inside that job (its log
  shows the base's build; its timeout and cancel apply; a failure fails that job and the next
  venv job tries again): the record first (``building``), then the directory for the build
  user, the rattler child as the build user, the freeze (the daemon's, read-only, with its
  digest: see ``freeze``), the package inventory, the record ``ready``. One build of a base at
  a time, under its ``NameLock`` (``.envctl/locks/.base-python-<key>.lock``: across daemons
  sharing the root, and between the jobs of this one); a base not ``ready`` found by the
  holder is a dead build's (removed). A second venv job waits for the lock — for the base it
  needs — instead of failing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..config import RequestsConfig
from ..errors import BuildFailed, Conflict
from . import envs, layout
from .backends.rattler import default_platforms
from .freeze import Frozen
from .lock import NameLock
from .procs import BuildUser

AREA_DIR = "base"  # <root>/.envctl/base: the daemon's (0755), like .envctl/envs
_RETRY = 2.0  # seconds between tries for a base another daemon is building


def _solve_input(cfg: RequestsConfig) -> dict[str, list[str]]:
    """What rattler solves for the base: everything its key depends on."""
    assert cfg.venv_base is not None
    return {"channels": list(cfg.venv_base.channels or cfg.default_channels),
            "specs": list(cfg.venv_base.dependencies),
            "platforms": list(cfg.platforms) or default_platforms()}


def base_name(cfg: RequestsConfig) -> str:
    """``python-<key>``: the same ``venv_base`` always names the same base."""
    canonical = json.dumps(_solve_input(cfg), sort_keys=True).encode()
    return f"python-{hashlib.sha256(canonical).hexdigest()[:12]}"


def build_file(cfg: RequestsConfig) -> str:
    """The rattler child's ``build.json`` for the base (written into the venv job's dir)."""
    return json.dumps({**_solve_input(cfg), "variables": {}}, indent=2) + "\n"


def interpreter(area: layout.RootArea, name: str) -> Path:
    """The base's interpreter, what venvs are created by (and keep as ``home``)."""
    return area.path(AREA_DIR, name, "bin", "python3")


@contextlib.contextmanager
def _locked(fds: layout.AreaFds, area: layout.RootArea, name: str, job_id: str,
            say: Callable[[str], None], wait: Callable[[float], None],
            timeout: float) -> Iterator[None]:
    """Hold the base's build lock, waiting (abortably, up to ``timeout``) while another job of
    this daemon or another daemon holds it: it is building the very base this job needs."""
    deadline = time.monotonic() + timeout
    lock = NameLock(fds.locks, str(area.root), f".base-{name}", job_id)
    told = False
    while True:
        try:
            lock.acquire()
            break
        except Conflict as exc:
            if time.monotonic() >= deadline:
                raise BuildFailed(f"gave up waiting for the venv base {name}: {exc.message}",
                                  hint="request it again later") from None
            if not told:
                say(f"waiting for the venv base {name}: {exc.message}")
                told = True
            wait(_RETRY)
    try:
        yield
    finally:
        lock.release()


def ensure(fds: layout.AreaFds, area: layout.RootArea, cfg: RequestsConfig, user: BuildUser,
           job_id: str, build: Callable[[int, Path], Frozen], say: Callable[[str], None],
           wait: Callable[[float], None]) -> Path:
    """The interpreter of the base ``cfg.venv_base`` names, built first if it is not ready.

    ``build(base_fd, prefix)`` installs and freezes the base at ``prefix`` (the caller's job
    runs the rattler child and the freeze); ``wait(seconds)`` sleeps and raises when the job is
    aborted. ``fds`` are :meth:`layout.RootArea.open`'s."""
    name = base_name(cfg)
    python = interpreter(area, name)
    with _locked(fds, area, name, job_id, say, wait, cfg.timeout):
        base_fd = layout.checked_dir(fds.area, AREA_DIR, 0o755, str(area.path(AREA_DIR)))
        try:
            envs.clear_dead(base_fd, None)  # only what a dead removal or write left: no vN here
            if envs.ready(base_fd, name) is not None:
                say(f"venv base: {python} (built before)")
                return python
            if layout.exists(base_fd, name) or layout.exists(base_fd, f"{name}.json"):
                envs.drop_version(base_fd, name)
                say(f"removed the venv base {name} left half-built by an interrupted build")
            _build(base_fd, area, cfg, user, job_id, name, build, say)
        finally:
            os.close(base_fd)
    return python


def _build(base_fd: int, area: layout.RootArea, cfg: RequestsConfig, user: BuildUser,
           job_id: str, name: str, build: Callable[[int, Path], Frozen],
           say: Callable[[str], None]) -> None:
    prefix = area.path(AREA_DIR, name)
    solve = _solve_input(cfg)
    record: dict[str, Any] = {
        "format": envs.FORMAT, "name": name, "kind": "venv-base", "job": job_id,
        "host": socket.gethostname(), "created_at": time.time(), "prefix": str(prefix),
        "dependencies": solve["specs"], "channels": solve["channels"],
        "platforms": solve["platforms"]}
    say(f"building the venv base {name} at {prefix} (requests.venv_base: "
        f"{', '.join(solve['specs'])}); every venv built from now on runs its bin/python3")
    envs.begin(base_fd, name, record, user.uid, user.gid)
    try:
        frozen = build(base_fd, prefix)
        if not os.access(interpreter(area, name), os.X_OK):
            raise BuildFailed(f"the venv base {name} has no bin/python3",
                              hint="requests.venv_base.dependencies must install python")
        ready = envs.ready_fields(base_fd, name)
        envs.write_record(base_fd, f"{name}.json", {**record, **ready, **frozen.fields()})
    except BaseException:
        envs.drop_version(base_fd, name)
        say(f"removed the unfinished venv base {name}")
        raise
    say(f"venv base {name} is ready ({len(ready['packages'])} packages, "
        f"{ready['entries']} entries)")

