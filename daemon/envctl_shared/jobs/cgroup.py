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

Limits (``requests.limits``): the memory, pids and cpu controllers set ``memory.max`` (no swap
beyond it), ``pids.max`` and ``cpu.weight`` on each job's cgroup, and their event counters
(``memory.events`` ``oom_kill``, ``pids.events`` ``max``) tell the runner which limit a failed
step hit. For a job's cgroup to have them, ``base`` and the daemon's own cgroup must enable
them in ``cgroup.subtree_control`` — and cgroup v2 lets a cgroup other than the root do that
only while no process sits in it ("no internal processes"). Under systemd the daemon's own
cgroup is the unit's, with the daemon in it: :func:`setup` then moves the daemon into the leaf
``base/daemon`` first (which stays while the daemon runs: ``base`` is no longer removed when
idle). A controller the host does not offer there (a hybrid host binds memory, pids and cpu to
cgroup v1 hierarchies, RHEL 8's default) is used in its v1 hierarchy instead, in a cgroup of
the same name (``memory.limit_in_bytes``, ``memory.memsw.limit_in_bytes``, ``pids.max``,
``cpu.shares``), which the gate process enters with the v2 one. A controller found nowhere is
reported missing (``status``, ``doctor``): builds run without that limit.
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

from ..config import BuildLimits

log = logging.getLogger(__name__)

DAEMON_LEAF = "daemon"  # base/daemon: where the daemon moves when its own cgroup must enable
# The controllers requests.limits needs, with the limit each one enforces.
LIMITED_BY = {"memory": "memory", "pids": "tasks", "cpu": "cpu_weight"}
# controller -> (file, key) of the counter that says the limit was hit, in v2 and in v1
_HITS = {"memory": (("memory.events", "oom_kill"), ("memory.oom_control", "oom_kill")),
         "pids": (("pids.events", "max"), ("pids.events", "max"))}

SETTLE = 5.0  # seconds a killed cgroup may take to empty (exit of many processes, NFS I/O)


@dataclass(frozen=True)
class JobCgroup:
    """One job's cgroup (``path``, in v2: what contains and kills it) and, for the limit
    controllers only a v1 hierarchy has here, its cgroups there (``v1``: controller → dir)."""

    path: Path
    v1: dict[str, Path] = field(default_factory=dict)

    def enter(self, pid: int) -> None:
        """Move ``pid`` (a whole process) into the job's cgroups: v2 first (containment)."""
        enter(self.path, pid)
        for place in self.v1.values():
            enter(place, pid)

    def hits(self) -> dict[str, int]:
        """How often each limit controller refused the job (OOM kills, refused forks), by
        the ``requests.limits`` key it enforces."""
        out = {}
        for controller, (v2, v1) in _HITS.items():
            where = self.v1.get(controller)
            name, key = v1 if where is not None else v2
            out[LIMITED_BY[controller]] = _counter((where or self.path) / name, key)
        return out


@dataclass(frozen=True)
class CgroupTree:
    """This daemon's build cgroups below ``base``, which exists only while it holds one (or
    the daemon sits in ``base/daemon``, see the module's doc): an idle daemon leaves no job
    cgroup behind, even when it is killed. ``v1``: controller → this tree's base in the v1
    hierarchy that has it; ``controllers``: the limit controllers that work (in v2 or v1),
    ``missing``: controller → why not."""

    base: Path
    v1: dict[str, Path] = field(default_factory=dict)
    controllers: tuple[str, ...] = ()
    missing: dict[str, str] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, compare=False, repr=False)

    def path(self, job_id: str) -> Path:
        return self.base / f"job-{job_id}"

    def create(self, job_id: str, limits: BuildLimits | None = None) -> JobCgroup:
        """A new, empty cgroup for one job, owned by root (a build can neither write to it nor
        make cgroups below it), with ``limits`` set where a controller enforces them."""
        job = JobCgroup(self.path(job_id),
                        {c: top / self.path(job_id).name for c, top in self.v1.items()})
        try:
            with self._lock:  # not between another job's removal of its cgroup and of base
                self.base.mkdir(exist_ok=True)
                for controller in self.controllers:  # again: an idle tree's base was removed
                    if controller not in self.v1:
                        _enable(self.base, controller, None)
                job.path.mkdir(mode=0o755)
                for place in job.v1.values():
                    place.parent.mkdir(exist_ok=True)
                    place.mkdir(mode=0o755)
            for controller in self.controllers:
                if limits is not None:
                    _set_limit(controller, job.v1.get(controller, job.path), limits,
                               controller in job.v1)
        except OSError:
            self.discard(job.path)  # nothing runs in it yet: never half made
            raise
        return job

    def discard(self, path: Path) -> int:
        """Kill and remove one job's cgroup (and ``base`` if it was the last); return how many
        processes were killed."""
        with self._lock:
            killed = remove(path)
            for top in self.v1.values():
                _rmdir(top / path.name)
            self._tidy()
        return killed

    def clear(self) -> int:
        """Kill and remove every job cgroup under ``base``: what a dead daemon on this state dir
        left (called at start, before any build of ours exists). Returns processes killed."""
        with self._lock:
            killed = sum(remove(child) for child in _children(self.base))
            for top in self.v1.values():
                for child in _children(top):
                    _rmdir(child)  # emptied by the kills above: every process is in v2 too
            self._tidy()
        return killed

    def _tidy(self) -> None:
        for top in (self.base, *self.v1.values()):
            try:
                top.rmdir()
            except OSError:
                pass  # another job's cgroup (or the daemon's leaf) is still in it, or gone


def _set_limit(controller: str, where: Path, limits: BuildLimits, v1: bool) -> None:
    """Write one controller's limit into a job's cgroup (v2 files, or their v1 equivalents);
    a file the kernel lacks (no swap accounting) is skipped."""
    if controller == "memory":
        writes = ([("memory.limit_in_bytes", limits.memory),
                   ("memory.memsw.limit_in_bytes?", limits.memory)] if v1 else
                  [("memory.max", limits.memory), ("memory.swap.max?", 0)])
    elif controller == "pids":
        writes = [("pids.max", limits.tasks)]
    else:  # cpu: v1's shares are 1024 for the default weight 100
        writes = ([("cpu.shares", max(2, limits.cpu_weight * 1024 // 100))] if v1 else
                  [("cpu.weight", limits.cpu_weight)])
    for name, value in writes:  # "?": only with swap accounting
        if not name.endswith("?") or (where / name[:-1]).exists():
            (where / name.rstrip("?")).write_text(f"{value}\n")


def setup(state_dir: Path) -> tuple[CgroupTree | None, str]:
    """This daemon's cgroup tree and ``key=value`` words for the log: where and how it kills,
    which limit controllers work, or (None) why there is no tree."""
    mine = own_cgroup()
    if mine is None:
        return None, "reason=no-cgroup2"
    tag = f"envctl-{hashlib.sha256(str(state_dir).encode()).hexdigest()[:12]}"
    base = mine / tag
    try:
        base.mkdir(exist_ok=True)  # the proof that we may (:meth:`CgroupTree.clear` tidies)
    except OSError as exc:
        return None, f"reason={errno.errorcode.get(exc.errno or 0, exc.errno)} cgroup={mine}"
    how = "cgroup.kill" if (base / "cgroup.kill").exists() else "freeze"
    missing = _enable_v2(mine, base)
    v1 = {}
    for controller in list(missing):
        top = _v1_base(controller, tag)
        if top is not None:
            v1[controller] = top
            del missing[controller]
        else:
            missing[controller] += "; no writable cgroup v1 hierarchy has it either"
    tree = CgroupTree(base, v1, tuple(c for c in LIMITED_BY if c not in missing), missing)
    words = [f"cgroup={base}", f"kill={how}",
             *(f"{c}={'v1' if c in v1 else 'v2'}" for c in tree.controllers),
             *(f"missing_{c}={why!r}" for c, why in missing.items())]
    return tree, " ".join(words)


def _enable_v2(mine: Path, base: Path) -> dict[str, str]:
    """Enable the limit controllers for ``base``'s children (in ``mine``'s and ``base``'s
    ``cgroup.subtree_control``); return those that could not be, with why. ``mine`` holds the
    daemon: it moves to ``base/daemon`` when the no-internal-processes rule refuses."""
    missing = {}
    offered = set(_read(mine / "cgroup.controllers").split())
    for controller in LIMITED_BY:
        if controller not in offered:
            missing[controller] = f"not offered to {mine} (cgroup.controllers)"
            continue
        try:
            _enable(mine, controller, base)
            _enable(base, controller, None)
        except OSError as exc:
            missing[controller] = f"cannot enable in cgroup.subtree_control: {exc.strerror}"
    return missing


def _enable(cgroup: Path, controller: str, leaf_parent: Path | None) -> None:
    """``+controller`` in ``cgroup.subtree_control``; on EBUSY (processes in ``cgroup``) with
    ``leaf_parent``, move this process to ``leaf_parent/daemon`` and try once more — and back
    when that fails too (other processes share our cgroup: a test run, a unit's helpers)."""
    control = cgroup / "cgroup.subtree_control"
    if controller in _read(control).split():
        return
    try:
        control.write_text(f"+{controller}\n")
        return
    except OSError as exc:
        if exc.errno != errno.EBUSY or leaf_parent is None:
            raise
    leaf = leaf_parent / DAEMON_LEAF
    leaf.mkdir(exist_ok=True)
    enter(leaf, os.getpid())
    try:
        control.write_text(f"+{controller}\n")
    except OSError:
        enter(cgroup, os.getpid())
        _rmdir(leaf)
        raise
    log.info("cgroup-daemon-moved to=%s reason=no-internal-processes", leaf)


def _v1_base(controller: str, tag: str) -> Path | None:
    """This tree's base in the cgroup v1 hierarchy that has ``controller`` (next to this
    process's own cgroup there), made now; None when there is none or it is not writable."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
        mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    own = next((path for _, names, path in (line.split(":", 2) for line in lines)
                if controller in names.split(",")), None)
    if own is None:
        return None
    for line in mounts:
        fields, _, tail = line.partition(" - ")
        kind, _source, options = (tail.split() + ["", "", ""])[:3]
        if kind != "cgroup" or controller not in options.split(","):
            continue
        root, point = (_unescape(f) for f in fields.split()[3:5])
        rel = os.path.relpath(own, root)
        if rel == ".." or rel.startswith("../"):
            continue
        top = Path(point) / rel / tag if rel != "." else Path(point) / tag
        try:
            top.mkdir(exist_ok=True)
        except OSError:
            return None
        return top
    return None


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


def _counter(path: Path, key: str) -> int:
    """The value of ``key`` in a flat-keyed cgroup file (``memory.events``), 0 when absent."""
    for line in _read(path).splitlines():
        name, _, value = line.partition(" ")
        if name == key and value.strip().isdigit():
            return int(value)
    return 0


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
