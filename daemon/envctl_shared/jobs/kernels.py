"""Every environment as a Jupyter kernel: one kernelspec per env in ``kernels.dir``.

Why the daemon writes them: ipykernel's own kernelspec inside an env is named ``python3`` with
``argv: ["python", ...]`` — it collides with the default kernel and runs whatever ``python`` is
first on PATH. Users of a shared root want "the env called X" in the launcher. So after a build
(``runner``), and for every env in the root on ``envctl kernels sync``, the daemon:

- asks the env itself whether it can be a kernel: its ``bin/python`` runs ``find_spec
  ("ipykernel")`` (isolated mode, nothing imported) **as the build user**, in the build's
  cgroup when there is one, with a timeout, its strays swept — the env's own code (``.pth``
  files) never runs as root;
- writes ``<kernels.dir>/envctl-<name>/kernel.json``: a name that cannot collide with anyone
  else's (``envctl-`` + the env name, lower case as Jupyter wants, with a short hash when the
  name had capitals), a display name users recognise, ``argv`` a small ``sh`` launcher that resolves
  the env's stable path ``<root>/<name>`` when the kernel starts and runs that version's
  ``bin/python`` with the variables activation would set (``PATH`` first, ``CONDA_PREFIX`` or
  ``VIRTUAL_ENV``): a replaced env is picked up at the next kernel start, and a running kernel
  keeps importing from the version it started on (which GC keeps for ``gc_grace``);
- writes atomically (a temporary file renamed over ``kernel.json``) through directory fds
  opened ``O_NOFOLLOW`` (the kernels directory may be writable by users: a symlink planted as
  ``envctl-x`` is refused, never followed). Files are the daemon's, 0644 in 0755 directories:
  every user can read them, no user can point another user's kernel elsewhere;
- removes the kernelspec when the env has none to offer (no ipykernel any more, or gone).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import stat
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import Config
from ..errors import FilesystemError
from ..heal.fsops import DIR_FLAGS
from . import cgroup as cgroups
from . import envs, procs
from .layout import remove_tree

log = logging.getLogger(__name__)

PREFIX = "envctl-"
PROBE_TIMEOUT = 60.0
# Exit 0 when ipykernel is importable; find_spec locates the package without running it.
_PROBE = "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('ipykernel') else 3)"
_KERNEL_NAME = re.compile(r"[a-z0-9._-]+")


@dataclass(frozen=True)
class SyncResult:
    """What ``sync`` did, for the ``kernels-sync`` reply."""

    written: tuple[str, ...]
    removed: tuple[str, ...]
    skipped: tuple[str, ...]  # being built right now: the build writes its own


def kernel_name(env: str) -> str:
    """``envctl-<env>`` in the lower case Jupyter requires; a name with capitals gets a hash
    of its exact spelling, so ``Foo`` and ``foo`` stay two kernels."""
    low = env.lower()
    if low == env:
        return PREFIX + env
    return f"{PREFIX}{low}-{hashlib.sha256(env.encode()).hexdigest()[:8]}"


def probe(prefix: Path, user: procs.BuildUser, home: Path, cgroup: Path | None = None,
          stop: threading.Event | None = None) -> bool:
    """True when ``prefix/bin/python``, run as the build user, finds ipykernel."""
    python = prefix / "bin" / "python"
    if not os.path.exists(python):
        return False
    step = procs.spawn([str(python), "-I", "-c", _PROBE], user, home, cgroup)
    proc = step.proc
    deadline = time.monotonic() + PROBE_TIMEOUT
    try:
        step.release()
        while proc.poll() is None and time.monotonic() < deadline:
            if stop is not None and stop.wait(0.05):
                break
            try:
                proc.wait(0.05)
            except subprocess.TimeoutExpired:
                pass
    finally:
        step.close_gate()
        procs.kill_group(proc.pid, grace=0, leader=proc)
        step.wait()
        if cgroup is not None:
            cgroups.kill(cgroup)
        procs.sweep(user)
        assert proc.stdout is not None
        proc.stdout.close()
    return proc.returncode == 0


# The kernel's launcher: resolve the stable path once, at start, and run the version it names.
# A running kernel so stays on the version it started with (its imports, its subprocesses'
# PATH) while ``<root>/<name>`` switches under it; the next start takes the new one. POSIX sh,
# no braces: jupyter_client substitutes ``{name}`` patterns in every argv element.
_LAUNCH = ('if ! p=$(cd -P -- "$1" 2>/dev/null && pwd); then '
           'echo "envctl: environment $1 is gone" >&2; exit 1; fi\n'
           'export PATH="$p/bin:$PATH"\n'
           'if [ -f "$p/pyvenv.cfg" ]; then export VIRTUAL_ENV="$p"; '
           'else export CONDA_PREFIX="$p" CONDA_DEFAULT_ENV="$3"; fi\n'
           'exec "$p/bin/python" -m ipykernel_launcher -f "$2"\n')


def spec_for(config: Config, env: str) -> dict[str, object]:
    """The kernelspec of the env called ``env``: through its stable path, resolved at start."""
    prefix = config.requests_root.path / env
    return {"argv": ["/bin/sh", "-c", _LAUNCH, "envctl-kernel", str(prefix),
                     "{connection_file}", env],
            "display_name": f"{config.kernels.display_prefix}: {env}",
            "language": "python",
            "metadata": {"envctl": {"env": env, "prefix": str(prefix)},
                         "debugger": True}}


def publish(config: Config, env: str, has_kernel: bool) -> str:
    """Write (``has_kernel``) or remove the env's kernelspec; a line for the build log."""
    assert config.kernels.dir is not None
    name = kernel_name(env)
    with _KernelsDir(config.kernels.dir) as kdir:
        if has_kernel:
            kdir.write(name, spec_for(config, env))
            return f"kernelspec {name} written in {config.kernels.dir}"
        if kdir.remove(name):
            return f"kernelspec {name} removed (the environment has no ipykernel)"
    return "no kernelspec: the environment has no ipykernel"


def sync(config: Config, user: procs.BuildUser, busy: set[str]) -> SyncResult:
    """Make ``kernels.dir`` hold exactly one kernelspec per env of the root that has ipykernel
    (hand-made envs included); names in ``busy`` (being built) are left to their build."""
    assert config.kernels.dir is not None
    root = config.requests_root.path
    wanted: dict[str, str] = {}
    skipped = []
    managed = _managed_names(root)
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if entry.name.startswith(".") or not (entry.is_dir(follow_symlinks=False)
                                              or entry.name in managed):
            continue
        if entry.name in busy:
            skipped.append(entry.name)
            continue
        if probe(Path(entry.path), user, Path("/")):
            wanted[kernel_name(entry.name)] = entry.name
    written, removed = [], []
    busy_names = {kernel_name(n) for n in busy}
    with _KernelsDir(config.kernels.dir) as kdir:
        for name, env in wanted.items():
            kdir.write(name, spec_for(config, env))
            written.append(name)
        for name in kdir.ours():
            if name not in wanted and name not in busy_names and kdir.remove(name):
                removed.append(name)
    log.info("kernels-sync written=%d removed=%d skipped=%d", len(written), len(removed),
             len(skipped))
    return SyncResult(tuple(written), tuple(removed), tuple(skipped))


def _managed_names(root: Path) -> set[str]:
    """Names in the root that are the daemon's symlinks to a current version (``envs``)."""
    fd = os.open(root, DIR_FLAGS)
    try:
        return {n for n in os.listdir(fd) if envs.current(fd, n).kind == "managed"}
    finally:
        os.close(fd)


class _KernelsDir:
    """``kernels.dir`` opened once; every change relative to its fd, never via a symlink."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = -1

    def __enter__(self) -> _KernelsDir:
        os.makedirs(self.path, mode=0o755, exist_ok=True)
        try:
            self.fd = os.open(self.path, DIR_FLAGS)
        except OSError as exc:
            raise FilesystemError(f"kernels.dir {self.path} cannot be opened as a directory: "
                                  f"{exc.strerror}", hint="check kernels.dir") from None
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)

    def _own_dir(self, name: str, create: bool) -> int | None:
        """An fd on ``name`` if it is a directory the daemon owns (made when ``create``);
        None when absent; FilesystemError when something else sits there."""
        if create:
            try:
                os.mkdir(name, 0o755, dir_fd=self.fd)
            except FileExistsError:
                pass
        try:
            fd = os.open(name, DIR_FLAGS, dir_fd=self.fd)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise FilesystemError(f"{self.path / name} is not a directory ({exc.strerror}): "
                                  "left alone", hint="remove it; the daemon recreates it "
                                  "(envctl kernels sync)") from None
        st = os.fstat(fd)
        if st.st_uid != os.geteuid():
            os.close(fd)
            raise FilesystemError(f"{self.path / name} is owned by uid {st.st_uid}, not by the "
                                  "daemon: left alone", hint="remove it; the daemon recreates "
                                  "it (envctl kernels sync)")
        if stat.S_IMODE(st.st_mode) != 0o755:
            os.fchmod(fd, 0o755)
        return fd

    def write(self, name: str, spec: dict[str, object]) -> None:
        assert _KERNEL_NAME.fullmatch(name)
        fd = self._own_dir(name, create=True)
        assert fd is not None
        tmp = f".kernel.json.{secrets.token_hex(4)}"
        try:
            out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                          | os.O_CLOEXEC, 0o644, dir_fd=fd)
            with os.fdopen(out, "w", encoding="utf-8") as fh:
                json.dump(spec, fh, indent=1, sort_keys=True)
                fh.write("\n")
                fh.flush()
                os.fchmod(fh.fileno(), 0o644)
                os.fsync(fh.fileno())
            os.replace(tmp, "kernel.json", src_dir_fd=fd, dst_dir_fd=fd)
        except BaseException:
            try:
                os.unlink(tmp, dir_fd=fd)
            except FileNotFoundError:
                pass
            raise
        finally:
            os.close(fd)

    def remove(self, name: str) -> bool:
        """Remove the daemon's kernelspec ``name``; True if there was one."""
        try:
            fd = self._own_dir(name, create=False)
        except FilesystemError as exc:
            log.warning("kernels-remove-refused name=%s problem=%s", name, exc.message)
            return False
        if fd is None:
            return False
        os.close(fd)
        return remove_tree(self.fd, name)

    def ours(self) -> list[str]:
        """Names of ``envctl-*`` kernelspec directories the daemon owns."""
        out = []
        for entry in os.scandir(self.fd):
            if entry.name.startswith(PREFIX) and _KERNEL_NAME.fullmatch(entry.name):
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid():
                    out.append(entry.name)
        return out
