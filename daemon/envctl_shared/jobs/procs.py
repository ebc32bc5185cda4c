"""Build processes: spawned as the build user in their own group; groups killed, orphans too.

Why these rules:
- package code never as root: the child drops to the build user with ``setgroups`` (the build user's
  own groups from the group database, as a login would have: never the daemon's), ``setregid``,
  ``setreuid`` (``subprocess``'s ``extra_groups``/``group``/``user``, done in C between fork and
  exec — a ``preexec_fn`` is unsafe in a threaded daemon; in a :class:`Sandbox`, ``setpriv`` does
  the same once the namespace is set up). Only a *trusted* step (the daemon's own code, e.g.
  py-rattler's download and link) runs as the daemon. An admin who adds the build user to a ``2770``
  root's group as a supplementary member therefore gets what they expect, and a build user who
  cannot enter the requests root at all is refused at start with the fix (:func:`check_reach`), not
  by every build failing on "Permission denied";
- ``start_new_session``: the build is the leader of a new session and process group, so cancel
  and timeout kill everything it started (``killpg``), not just the first process;
- ``setpriv --pdeathsig KILL``: the leader dies with the daemon thread that started it (set
  *after* the uid change, which would clear it). Its own children do not inherit that, hence:
- the pgid and the leader's start time are recorded, and a restarted daemon kills the group it
  left behind (``kill_orphans``) — checking the start time, the uid and the group so that a
  recycled pid is never hit;
- a gate: the step starts as ``sh`` blocked reading its stdin, and ``exec``s the real command
  only when ``Step.release`` writes ``go`` — which the runner does after the group is on disk.
  Without it a daemon killed between fork and that write left a group no restart could find
  (the leader died of its parent-death signal, its children ran on). If the daemon dies before
  the release the pipe reads EOF and the gate exits: nothing of the build ever ran;
- a cgroup per build where cgroup v2 is writable (``jobs/cgroup.py``): the gate process is
  moved into it before the release, so nothing of the build can leave it, and the cgroup is
  killed after every step and by a restarted daemon — the one mechanism that misses nothing;
- the daemon is the subreaper of its builds (``adopt_orphans``): a process whose parent exits
  is re-parented to us, not to init. After every step, ``sweep`` kills what runs as the build
  user below us outside any running step's group — a build that ``setsid``-ed a background
  process out of its group would otherwise outlive cancel and keep writing, as the owner, to
  the environment declared ready — and reaps the zombies that killing leaves us;
- at start, ``sweep_orphans`` kills what runs as the build user below init or our own
  ancestors (whichever subreaper adopted them): the builds of a daemon that died
  (``kill -9``) that no cgroup holds (a host without a writable cgroup v2, or an older
  daemon) and that left their process group;
- a scrubbed environment: only PATH, HOME/TMPDIR (the job's own dir), LANG and a few tool
  switches; nothing of the daemon's environment (tokens, proxies, SSH agents) leaks in;
- one uid per running build, from a pool (``requests.build_users``): processes of one uid can
  ``ptrace`` each other and open each other's files through ``/proc/<pid>/root`` — mount
  namespace or not (tried here: a second build of the same uid wrote into the first one's
  writable version through it). So a daemon with one build user runs one build at a time;
- a mount namespace per step (:class:`Sandbox`, where ``unshare --mount`` works): every root,
  the state dir and the kernels dir read-only, only the step's own directories writable,
  ``/tmp``, ``/var/tmp``, ``/dev/shm`` and ``/run/lock`` fresh and private. It is set up as
  root *before* the uid switch (the writable places are bound from fds opened before anything
  was covered: a bind made through a read-only mount is read-only, and a tmpfs on ``/tmp``
  hides what lay below it), every fd to the original mounts is closed before the step's code
  runs, and no step keeps ``CAP_SYS_ADMIN`` (a trusted step, which stays root, drops it from
  its bounding set): no step can remount. Mount flags of a namespace made by root are locked
  for a user namespace a build makes inside it, so ``unshare -Urm`` cannot lift them either.
"""

from __future__ import annotations

import ctypes
import logging
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ..accounts import group_name
from ..config import Config, RequestsConfig
from ..errors import ConfigError
from . import cgroup as cgroups

log = logging.getLogger(__name__)

KILL_GRACE = 3.0  # seconds between SIGTERM and SIGKILL
SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"
# envctl_shared itself: a trusted step runs a file of it
PACKAGE_DIR = Path(__file__).resolve().parent.parent
# argv[0] of the gate ("$0"), then the step's argv ("$@"); the step gets /dev/null as stdin.
GATE = ("/bin/sh", "-c", 'IFS= read -r go && [ "$go" = go ] || exit 125; exec "$@" </dev/null',
        "envctl-gate")


@dataclass(frozen=True)
class BuildUser:
    """Who builds: ``switch`` is False when the daemon already runs as this uid."""

    uid: int
    gid: int
    name: str
    switch: bool
    groups: tuple[int, ...] = ()  # supplementary, from the group database


def daemon_user() -> BuildUser:
    """The daemon itself, as the user of a trusted step (no switch)."""
    me = pwd.getpwuid(os.geteuid())
    return BuildUser(me.pw_uid, os.getegid(), me.pw_name, False)


def build_users(cfg: RequestsConfig) -> tuple[BuildUser, ...]:
    """The pool of accounts builds run as, one running build per account
    (``requests.build_users``, else the one ``requests.build_user``); ConfigError when the
    daemon is root and none is configured. A daemon that is not root builds as itself."""
    if os.geteuid() != 0:
        return (daemon_user(),)
    names = cfg.build_users or ((cfg.build_user,) if cfg.build_user else ())
    if not names:
        raise ConfigError("requests.build_users is not set: the daemon runs as root and never "
                          "builds environments as root",
                          hint="create unprivileged accounts (see docs/systemd.md: "
                               "envctl-build1..N) and list them in requests.build_users")
    return tuple(_account(name) for name in names)


def build_user(cfg: RequestsConfig) -> BuildUser:
    """The pool's first account (for work outside a build: a kernel probe, ``kernels sync``)."""
    return build_users(cfg)[0]


def _account(name: str) -> BuildUser:
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        raise ConfigError(f"build user {name!r} does not exist") from None
    if pw.pw_uid == 0:
        raise ConfigError(f"build user {name!r} is root: builds never run as root")
    groups = tuple(g for g in os.getgrouplist(pw.pw_name, pw.pw_gid) if g != pw.pw_gid)
    return BuildUser(pw.pw_uid, pw.pw_gid, pw.pw_name, True, groups)


def check_reach(user: BuildUser, root: Path) -> None:
    """ConfigError unless the build user can enter ``root``: every version is built below it.

    Asked of the kernel, as the build user with its groups (a ``cd`` in a child), so that
    modes, supplementary groups and ACLs all count as they will for the build."""
    if not user.switch:
        return  # the daemon's own uid: it made the area below the root itself
    res = subprocess.run(["/bin/sh", "-c", 'cd -- "$1"', "sh", str(root)], env={"PATH": SAFE_PATH},
                         capture_output=True, timeout=30, user=user.uid, group=user.gid,
                         extra_groups=list(user.groups), cwd="/")
    if res.returncode == 0:
        return
    try:
        st = os.stat(root)
        group = group_name(st.st_gid)
        how = f" (mode {stat.S_IMODE(st.st_mode):04o}, group {group})"
    except OSError as exc:
        group, how = "its group", f" ({exc.strerror})"
    raise ConfigError(f"the build user {user.name} cannot enter the requests root {root}{how}:"
                      " every build would fail",
                      hint=f"add {user.name} to {group} (usermod -aG {group} {user.name}), "
                           "then restart envctld")


def scrubbed_env(user: BuildUser, home: Path,
                 passthrough: tuple[str, ...] = ()) -> dict[str, str]:
    """The whole environment a build sees: the fixed set, plus the variables the admin named
    (``requests.build_env``, e.g. HTTPS_PROXY) as the daemon itself has them."""
    passed = {k: os.environ[k] for k in passthrough if k in os.environ}
    return {**passed, "PATH": SAFE_PATH, "HOME": str(home), "TMPDIR": str(home),
            "USER": user.name, "LOGNAME": user.name, "LANG": "C.UTF-8",
            "PYTHONNOUSERSITE": "1", "PIP_NO_INPUT": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


@dataclass
class Step:
    """A spawned build step, held at its gate until :meth:`release`, counted as running (its
    group spared by :func:`sweep`) until :meth:`wait` has reaped it."""

    proc: subprocess.Popen[bytes]

    def release(self) -> None:
        """Let the command run: call only once its process group is recorded."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(b"go\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass  # the gate was killed (cancel or stop): the step just fails
        self.close_gate()

    def close_gate(self) -> None:
        """Never released: the gate reads EOF and exits without running anything."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.close()
        except BrokenPipeError:
            pass

    def wait(self) -> int:
        """Reap the leader; from now on its group is no running step's."""
        code = self.proc.wait()
        with _steps_lock:
            _running.discard(self.proc.pid)
        return code


# A fresh tmpfs each, in every sandboxed step (those the host has): every directory a build
# uid may write on a stock host besides its own. A host's /var/tmp or /run/lock let a build
# write past limits.disk (not its version, not its HOME) and leave files for the next build
# of its pool account, another requester's. A tmpfs is charged to the step's memory cgroup.
PRIVATE_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")
# Run as root in the step's new mount namespace; argv: (ro|rw PATH)... -- COMMAND...
# Each place is opened first, so that it is bound from the original mount (neither covered by
# a tmpfs nor read-only through a bind made earlier); each bind is then remounted with its own
# flags, and its fd closed before the command (which drops root) is exec'd.
_SETUP = r"""set -eu
kinds=() paths=() fds=()
while [ "$1" != -- ]; do
  exec {fd}<"$2"
  kinds+=("$1") paths+=("$2") fds+=("$fd")
  shift 2
done
shift
for d in {private}; do
  if [ -d "$d" ]; then mount -t tmpfs -o nosuid,nodev,mode=1777 envctl-private "$d"; fi
done
for i in "${!paths[@]}"; do
  p=${paths[$i]} fd=${fds[$i]}
  mkdir -p -- "$p"
  mount -c --bind "/proc/self/fd/$fd" "$p"
  flags=nosuid,nodev; [ "${kinds[$i]}" = rw ] || flags=ro,$flags
  mount -c -o "remount,bind,$flags" "$p"
  exec {fd}<&-
done
cd -- "$HOME"  # again: the cwd inherited is on the original mount, not on its bind
exec "$@"
""".replace("{private}", " ".join(PRIVATE_DIRS))


@dataclass(frozen=True)
class Sandbox:
    """A step's mount namespace: ``read_only`` places bound read-only onto themselves,
    ``writable`` ones (the step's own: its version, its home, the cache for a trusted step)
    bound writable on top, and :data:`PRIVATE_DIRS` fresh. Missing places are left out (a
    mount point must exist)."""

    read_only: tuple[Path, ...]
    writable: tuple[Path, ...]

    def argv(self) -> list[str]:
        """``kind path`` pairs, outer places first: a bind covers what lies below it."""
        places = sorted({(str(p), "ro") for p in self.read_only if p.is_dir()}
                        | {(str(p), "rw") for p in self.writable if p.is_dir()},
                        key=lambda e: (e[0].count("/"), e[1] == "rw", e[0]))
        return [x for path, kind in places for x in (kind, path)]


def sandbox_places(config: Config) -> tuple[Path, ...]:
    """What every step sees read-only: the roots (every env, built or hand-made), the state
    dir (other jobs' homes), the kernels dir, and the inputs an admin configured by path — the
    local channels, ``pip_args`` wheelhouses, ``venv_python``/``conda_exe``, the daemon's own
    Python and package (a trusted step runs a file of it; an editable install keeps it outside
    ``sys.prefix``) — bound so that they stay visible below a private dir (a root or a checkout
    in ``/tmp``, as in the tests and CI)."""
    cfg = config.requests
    places = [r.path for r in config.roots] + [cfg.state_dir, Path(sys.prefix),
                                               Path(sys.base_prefix), PACKAGE_DIR]
    if config.kernels.dir is not None:
        places.append(config.kernels.dir)
    base_channels = cfg.venv_base.channels if cfg.venv_base is not None else ()
    for arg in (*cfg.channels, *cfg.default_channels, *base_channels, *cfg.pip_args,
                cfg.venv_python, cfg.conda_exe or ""):
        path = Path(arg.removeprefix("file://"))
        if path.is_absolute():
            places.append(path if path.is_dir() else path.parent)
    return tuple(places)


_NAMESPACES: list[str] = []  # the probe's answer, once per process
_NAMESPACES_LOCK = threading.Lock()


def namespaces() -> str | None:
    """None when steps get a mount namespace here, else why not (asked once of the kernel)."""
    with _NAMESPACES_LOCK:
        if not _NAMESPACES:
            _NAMESPACES.append(_probe_namespaces())
    return _NAMESPACES[0] or None


def _probe_namespaces() -> str:
    unshare = shutil.which("unshare", path=SAFE_PATH)
    bash = shutil.which("bash", path=SAFE_PATH)
    if os.geteuid() != 0:
        return "the daemon is not root"
    if unshare is None or bash is None:
        return "unshare (util-linux) or bash is not installed"
    try:
        res = subprocess.run([unshare, "--mount", "--propagation", "private", bash, "-c",
                              "mount -t tmpfs envctl-probe /tmp"], env={"PATH": SAFE_PATH},
                             capture_output=True, timeout=30, cwd="/", check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    if res.returncode != 0:
        said = res.stderr.decode("utf-8", "replace").strip().splitlines()
        return said[-1] if said else f"unshare exited with status {res.returncode}"
    return ""


def _wrapped(argv: list[str], user: BuildUser, sandbox: Sandbox | None) -> tuple[list[str],
                                                                                  bool]:
    """The full command line of a step, and whether ``Popen`` must switch the user (only
    without a sandbox: in one, ``setpriv`` does it after the namespace is set up)."""
    setpriv = shutil.which("setpriv", path=SAFE_PATH)
    if setpriv is None:
        raise ConfigError("setpriv (util-linux) is not installed; builds need it")
    if sandbox is None:
        return [setpriv, "--pdeathsig", "KILL", "--", *GATE, *argv], user.switch
    unshare, bash = shutil.which("unshare", path=SAFE_PATH), shutil.which("bash", path=SAFE_PATH)
    assert unshare is not None and bash is not None  # namespaces() said they are there
    who: list[str] = []
    if user.switch:
        who = [f"--reuid={user.uid}", f"--regid={user.gid}",
               f"--groups={','.join(map(str, user.groups))}" if user.groups
               else "--clear-groups"]
    drop = ["--inh-caps=-sys_admin", "--bounding-set=-sys_admin"]
    return [setpriv, "--pdeathsig", "KILL", "--", unshare, "--mount", "--propagation",
            "private", bash, "-c", _SETUP, "envctl-sandbox", *sandbox.argv(), "--",
            setpriv, *who, *drop, "--pdeathsig", "KILL", "--", *GATE, *argv], False


def spawn(argv: list[str], user: BuildUser, home: Path,
          cgroup: cgroups.JobCgroup | None = None, passthrough: tuple[str, ...] = (),
          sandbox: Sandbox | None = None) -> Step:
    """Start one build step behind its gate, in ``cgroup`` when given (moved there while the
    gate still holds it: everything the command starts is born inside) and in ``sandbox``
    when given; stdout and stderr come back merged on ``step.proc.stdout``."""
    command, switch = _wrapped(argv, user, sandbox)
    ids: dict[str, object] = {}
    if switch:
        ids = {"user": user.uid, "group": user.gid, "extra_groups": list(user.groups)}
    with _steps_lock:  # a sweep never sees the new group before it counts as running
        proc = subprocess.Popen(  # type: ignore[call-overload]
            command, cwd=home,
            env=scrubbed_env(user, home, passthrough), stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, close_fds=True,
            start_new_session=True, umask=0o022, **ids)
        _running.add(proc.pid)
    step = Step(proc)
    if cgroup is not None:
        try:
            cgroup.enter(proc.pid)
        except OSError:
            step.close_gate()  # never contained, so never run
            kill_group(proc.pid, grace=0, leader=proc)
            step.wait()
            raise
    return step


# Leaders (= process groups) of this process's steps that are not reaped yet; process-wide,
# like the subreaper flag, so that several managers in one process spare each other's steps.
_steps_lock = threading.Lock()
_running: set[int] = set()
_PR_SET_CHILD_SUBREAPER = 36
_libc = ctypes.CDLL(None, use_errno=True)


def adopt_orphans() -> None:
    """Make this process the subreaper of its descendants (Linux ≥ 3.4)."""
    if _libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        log.warning("subreaper-unavailable error=%s: processes that leave a build's group "
                    "are not found after their parent exits", os.strerror(err))


@dataclass(frozen=True)
class Proc:
    """What /proc says about one process."""

    pid: int
    state: str  # "R", "S", "Z", ...
    ppid: int
    pgrp: int
    start: int  # clock ticks since boot
    uid: int  # real
    euid: int

    @property
    def zombie(self) -> bool:
        return self.state == "Z"

    def runs_as(self, uid: int) -> bool:
        """Real or effective uid: a build that ran a setuid binary is still the build."""
        return uid in (self.uid, self.euid)


def _proc(pid: int, pgrp: int | None = None) -> Proc | None:
    """From ``stat`` and ``status`` (None when gone, or not in process group ``pgrp``). The
    uids come from ``status``, not from who owns the ``/proc/<pid>`` entries: a process that
    made itself non-dumpable (``PR_SET_DUMPABLE`` 0) has its files there owned by root."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
        f = data[data.rindex(b")") + 2:].split()  # after "pid (comm) ": state is field 3
        if pgrp is not None and int(f[2]) != pgrp:
            return None  # not wanted: spare the second read
        with open(f"/proc/{pid}/status", "rb") as fh:
            uids = next(line for line in fh if line.startswith(b"Uid:")).split()
    except (OSError, StopIteration):
        return None  # gone
    return Proc(pid, f[0].decode(), int(f[1]), int(f[2]), int(f[19]), int(uids[1]),
                int(uids[2]))


def _table(pgrp: int | None = None) -> list[Proc]:
    """Every process, or the members of process group ``pgrp``."""
    procs = (_proc(int(e), pgrp) for e in os.listdir("/proc") if e.isdigit())
    return [p for p in procs if p is not None]


def start_time(pid: int) -> int | None:
    info = _proc(pid)
    return None if info is None else info.start


def _live_members(pgid: int) -> list[Proc]:
    return [p for p in _table(pgid) if not p.zombie]


def _reap(pid: int) -> None:
    """Collect a zombie child that no ``Popen`` owns (an adopted orphan)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass  # reaped meanwhile or not ours after all


def _settle(pgid: int, leader: int) -> bool:
    """Reap the group's zombies that are ours (never the leader: its ``Popen`` does);
    True while a member still runs. A zombie is dead: its parent reaps it."""
    me, running = os.getpid(), False
    for p in _table(pgid):
        if not p.zombie:
            running = True
        elif p.ppid == me and p.pid != leader:
            _reap(p.pid)
    return running


def kill_group(pgid: int, grace: float = KILL_GRACE,
               leader: subprocess.Popen[bytes] | None = None) -> None:
    """SIGTERM the whole group, then SIGKILL whatever is left after ``grace`` seconds.

    ``leader`` is reaped while waiting, so that its ``Popen`` keeps the exit status.
    """
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while True:
            if leader is not None:
                leader.poll()
            if not _settle(pgid, leader.pid if leader is not None else 0):
                return
            if time.monotonic() >= deadline:
                break
            time.sleep(0.05)


def _strays(uid: int, tops: frozenset[int]) -> list[Proc]:
    """Processes of ``uid`` hanging below one of ``tops`` through ``uid`` processes only, in
    no running step's group (a daemon running as root in between, as in tests, is a
    boundary)."""
    table = {p.pid: p for p in _table()}
    out = []
    for p in table.values():
        if not p.runs_as(uid) or p.pgrp in _running:
            continue
        up: Proc | None = p
        hops = 0
        while up is not None and up.runs_as(uid) and up.ppid not in tops and hops < 64:
            up, hops = table.get(up.ppid), hops + 1
        if up is not None and up.runs_as(uid) and up.ppid in tops:
            out.append(p)
    return out


def unlinked_bytes(pids: list[int], devices: set[int]) -> int:
    """Bytes of the regular files on ``devices`` that the processes ``pids`` hold open or
    mapped and that no directory links any more (``st_nlink`` 0): what a step writes after
    unlinking its file takes disk no tree walk sees, until the last process lets go. Read
    from ``/proc/<pid>/fd`` and ``/proc/<pid>/map_files`` (root's), each file counted once."""
    found: dict[tuple[int, int], int] = {}
    for pid in pids:
        for kind in ("fd", "map_files"):
            where = f"/proc/{pid}/{kind}"
            try:
                names = os.listdir(where)
            except OSError:  # gone, or not ours to look at
                continue
            for name in names:
                try:
                    st = os.stat(f"{where}/{name}")
                except OSError:
                    continue
                if st.st_nlink == 0 and st.st_dev in devices and stat.S_ISREG(st.st_mode):
                    found[(st.st_dev, st.st_ino)] = st.st_size
    return sum(found.values())


def sweep(user: BuildUser) -> int:
    """Kill the build user's processes below us that belong to no running step; reap them.

    Returns how many were killed. Only with a dedicated build user: a daemon that builds as
    itself cannot tell its builds' strays from itself.
    """
    return _kill_strays(user, frozenset({os.getpid()}))


def sweep_orphans(user: BuildUser) -> int:
    """At start: kill every build-user process that no live daemon holds — the builds of a
    daemon that died (``kill -9``), whatever group or session they made for themselves; return
    how many.

    A dead daemon's build processes were re-parented to the nearest subreaper above it: init,
    or the supervisor that restarts daemons (tini, a service manager, a test runner), which is
    an ancestor of ours as well. So the build-user processes hanging, through build-user
    processes only, below init, below one of our ancestors or below us are the orphans. Safe
    because the build user is envctl's alone (a dedicated system account) and a live daemon is
    the subreaper of its builds: every build process of a running daemon, escaped or not,
    hangs below that daemon. Another daemon sharing the build user is therefore spared.
    """
    table = {p.pid: p for p in _table()}
    tops, up = {1}, table.get(os.getpid())
    while up is not None:
        tops.add(up.pid)
        up = table.get(up.ppid)
    return _kill_strays(user, frozenset(tops))


def _kill_strays(user: BuildUser, tops: frozenset[int]) -> int:
    if not user.switch:
        return 0
    me, killed = os.getpid(), set()
    deadline = time.monotonic() + 2.0
    while True:
        with _steps_lock:  # no step is being spawned (and not yet counted) meanwhile
            strays = _strays(user.uid, tops)
            for p in strays:
                if p.zombie:
                    if p.ppid == me:
                        _reap(p.pid)
                elif p.pid not in killed:
                    try:
                        os.kill(p.pid, signal.SIGKILL)
                        killed.add(p.pid)
                    except ProcessLookupError:
                        pass
        # Zombies whose parent is not us are dead and not ours to reap; the rest need a turn.
        if not [p for p in strays if not p.zombie or p.ppid == me]:
            return len(killed)
        if time.monotonic() >= deadline:
            log.warning("sweep-incomplete uid=%d left=%d", user.uid, len(strays))
            return len(killed)
        time.sleep(0.02)


def kill_orphans(pgid: int, leader_start: int, uid: int) -> int:
    """Kill a build group a dead daemon left behind; return how many processes it had.

    The group is ours only if every member runs as the build uid and started no earlier than
    the recorded leader, and the leader (if still there) is the very process we started.
    """
    members = _live_members(pgid)
    if not members:
        return 0
    for p in members:
        recycled = p.pid == pgid and p.start != leader_start
        if not p.runs_as(uid) or p.start < leader_start or recycled:
            return 0
    deadline = time.monotonic() + 5.0
    # No reaping here: the dead daemon's orphans went to init (or to its subreaper), not to us.
    while _live_members(pgid) and time.monotonic() < deadline:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    return len(members)
