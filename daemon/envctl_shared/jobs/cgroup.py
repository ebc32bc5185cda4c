"""A cgroup v2 per build: the one container a build process cannot leave.

Why: a process group or a session is a build's to leave (``setsid``, ``setpgid``, a double
fork), a parent chain ends at init once the daemon is gone, and a non-dumpable process has
its ``/proc/<pid>`` files owned by root. Cgroup membership is none of these: an unprivileged
process cannot move itself out of a cgroup it cannot write, and every child starts in its
parent's.
So each build gets ``<base>/job-<id>``; the step's gate process is moved into it *before* the
gate opens (nothing of the build has run yet) and its path is stored with the job before that.
Killing the cgroup then cannot miss a process, however hard it tries: ``cgroup.kill`` (Linux
≥ 5.14) kills the whole subtree atomically; older kernels freeze the cgroup (nothing can fork
meanwhile), SIGKILL every pid in ``cgroup.procs`` and thaw it (a fatal signal gets through).

Where (``base``): a child of the daemon's own cgroup named after the state directory,
``<own cgroup>/envctl-<hash>``, so that a restarted daemon on the same state dir finds what its
predecessor left, and several daemons (test suites side by side) never share one. Under systemd
the unit's cgroup is the daemon's (``Delegate=yes`` makes that subtree ours; the unit makes it
writable despite ``ProtectControlGroups=``). The daemon stays where it is: the "no internal
processes" rule only binds cgroups that enable controllers for their children, and envctld
enables none — it uses only ``cgroup.procs``, ``cgroup.kill``/``cgroup.freeze`` and
``cgroup.events``, which every cgroup has.

No writable cgroup v2 (a v1-only host, ``/sys/fs/cgroup`` read-only in an unprivileged
container, a unit without ``Delegate=``): :func:`setup` says why and the caller falls back to
the build-user sweep (``procs.sweep_orphans``).
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

SETTLE = 5.0  # seconds a killed cgroup may take to empty (exit of many processes, NFS I/O)


@dataclass(frozen=True)
class CgroupTree:
    """This daemon's build cgroups below ``base``, which exists only while it holds one: an idle
    daemon leaves no cgroup behind, even when it is killed."""

    base: Path
    _lock: threading.Lock = field(default_factory=threading.Lock, compare=False, repr=False)

    def path(self, job_id: str) -> Path:
        return self.base / f"job-{job_id}"

    def create(self, job_id: str) -> Path:
        """A new, empty cgroup for one job, owned by root: a build can neither write to it nor
        make cgroups below it."""
        path = self.path(job_id)
        with self._lock:  # not between another job's removal of its cgroup and of base
            self.base.mkdir(exist_ok=True)
            path.mkdir(mode=0o755)
        return path

    def discard(self, path: Path) -> int:
        """Kill and remove one job's cgroup (and ``base`` if it was the last); return how many
        processes were killed."""
        with self._lock:
            killed = remove(path)
            self._tidy()
        return killed

    def clear(self) -> int:
        """Kill and remove every job cgroup under ``base``: what a dead daemon on this state dir
        left (called at start, before any build of ours exists). Returns processes killed."""
        with self._lock:
            killed = sum(remove(child) for child in _children(self.base))
            self._tidy()
        return killed

    def _tidy(self) -> None:
        try:
            self.base.rmdir()
        except OSError:
            pass  # another job's cgroup is still in it (or it is gone already)


def setup(state_dir: Path) -> tuple[CgroupTree | None, str]:
    """This daemon's cgroup tree and ``key=value`` words for the log: where and how it kills,
    or (None) why there is no tree."""
    mine = own_cgroup()
    if mine is None:
        return None, "reason=no-cgroup2"
    tag = hashlib.sha256(str(state_dir).encode()).hexdigest()[:12]
    base = mine / f"envctl-{tag}"
    try:
        base.mkdir(exist_ok=True)  # the proof that we may (:meth:`CgroupTree.clear` tidies)
    except OSError as exc:
        return None, f"reason={errno.errorcode.get(exc.errno or 0, exc.errno)} cgroup={mine}"
    how = "cgroup.kill" if (base / "cgroup.kill").exists() else "freeze"
    return CgroupTree(base), f"cgroup={base} kill={how}"


def own_cgroup() -> Path | None:
    """The directory of this process's cgroup v2, or None (no cgroup2 mount shows it)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
        mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    own = next((line[3:] for line in lines if line.startswith("0::")), None)
    if own is None or own.endswith(" (deleted)"):
        return None
    for line in mounts:
        fields, _, tail = line.partition(" - ")
        if not tail.startswith("cgroup2 "):
            continue
        root, point = (_unescape(f) for f in fields.split()[3:5])
        rel = os.path.relpath(own, root)
        if rel != ".." and not rel.startswith("../"):
            return Path(point) / rel if rel != "." else Path(point)
    return None


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes."""
    for code in ("\\040", "\\011", "\\012", "\\134"):
        field = field.replace(code, chr(int(code[1:], 8)))
    return field


def enter(path: Path, pid: int) -> None:
    """Move ``pid`` (a whole process) into the cgroup."""
    (path / "cgroup.procs").write_text(f"{pid}\n")


def members(path: Path) -> list[int]:
    """Live processes in the cgroup (a zombie is no longer listed)."""
    return [int(p) for p in _read(path / "cgroup.procs").split()]


def populated(path: Path) -> bool:
    try:
        return "populated 1" in (path / "cgroup.events").read_text()
    except FileNotFoundError:
        return False


def kill(path: Path, freeze: bool = False) -> int:
    """SIGKILL everything in the cgroup and wait (bounded) until it is empty; return how many
    processes were in it. A missing cgroup has none. ``freeze``: use the freezer even where
    ``cgroup.kill`` exists (how kernels < 5.14 are served; tests prove that path here)."""
    found = set(members(path))
    if not found:
        return 0
    if (path / "cgroup.kill").exists() and not freeze:
        _write(path / "cgroup.kill", "1")
    else:
        _freeze_and_kill(path)
    deadline = time.monotonic() + SETTLE
    while populated(path) and time.monotonic() < deadline:
        time.sleep(0.02)
    if populated(path):
        log.warning("cgroup-kill-incomplete path=%s left=%d", path, len(members(path)))
    return len(found)


def _freeze_and_kill(path: Path) -> None:
    """Linux < 5.14: frozen, nothing forks or exits between reading ``cgroup.procs`` and the
    kills (so no pid read there can meanwhile belong to another process)."""
    _write(path / "cgroup.freeze", "1")
    deadline = time.monotonic() + 1.0
    while "frozen 1" not in _read(path / "cgroup.events") and time.monotonic() < deadline:
        time.sleep(0.01)
    for pid in members(path):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _write(path / "cgroup.freeze", "0")


def remove(path: Path) -> int:
    """Kill the cgroup's processes, then remove it; return how many processes were killed."""
    killed = kill(path)
    _rmdir(path)
    return killed


def _rmdir(path: Path) -> None:
    deadline = time.monotonic() + SETTLE
    while True:
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as exc:  # EBUSY: a process still exiting
            if exc.errno != errno.EBUSY or time.monotonic() >= deadline:
                log.warning("cgroup-rmdir-failed path=%s error=%s", path, exc.strerror)
                return
            time.sleep(0.02)


def _children(path: Path) -> list[Path]:
    try:
        return [e for e in path.iterdir() if e.is_dir() and e.name.startswith("job-")]
    except OSError:
        return []


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _write(path: Path, text: str) -> None:
    try:
        path.write_text(text)
    except FileNotFoundError:
        pass  # the cgroup is gone: nothing left to kill
