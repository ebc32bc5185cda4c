"""Build processes: spawned as the build user in their own group; groups killed, orphans too.

Why these rules:
- never root: the child drops to the build user with ``setgroups([])``, ``setregid``,
  ``setreuid`` (``subprocess``'s ``extra_groups``/``group``/``user``, done in C between fork and
  exec — a ``preexec_fn`` is unsafe in a threaded daemon);
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
- the daemon is the subreaper of its builds (``adopt_orphans``): a process whose parent exits
  is re-parented to us, not to init. After every step, ``sweep`` kills what runs as the build
  user below us outside any running step's group — a build that ``setsid``-ed a background
  process out of its group would otherwise outlive cancel and keep writing, as the owner, to
  the environment declared ready — and reaps the zombies that killing leaves us;
- a scrubbed environment: only PATH, HOME/TMPDIR (the job's own dir), LANG and a few tool
  switches; nothing of the daemon's environment (tokens, proxies, SSH agents) leaks in.
"""

from __future__ import annotations

import ctypes
import logging
import os
import pwd
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import RequestsConfig
from ..errors import ConfigError

log = logging.getLogger(__name__)

KILL_GRACE = 3.0  # seconds between SIGTERM and SIGKILL
SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"
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


def build_user(cfg: RequestsConfig) -> BuildUser:
    """The account builds run as; ConfigError when the daemon is root and none is configured."""
    if os.geteuid() != 0:
        me = pwd.getpwuid(os.geteuid())
        return BuildUser(me.pw_uid, os.getegid(), me.pw_name, False)
    if not cfg.build_user:
        raise ConfigError("requests.build_user is not set: the daemon runs as root and never "
                          "builds environments as root",
                          hint="create an unprivileged account (e.g. envctl-build) and set "
                               "requests.build_user to it")
    try:
        pw = pwd.getpwnam(cfg.build_user)
    except KeyError:
        raise ConfigError(f"requests.build_user {cfg.build_user!r} does not exist") from None
    if pw.pw_uid == 0:
        raise ConfigError("requests.build_user must not be root")
    return BuildUser(pw.pw_uid, pw.pw_gid, pw.pw_name, True)


def scrubbed_env(user: BuildUser, home: Path) -> dict[str, str]:
    """The whole environment a build sees."""
    return {"PATH": SAFE_PATH, "HOME": str(home), "TMPDIR": str(home), "USER": user.name,
            "LOGNAME": user.name, "LANG": "C.UTF-8", "PYTHONNOUSERSITE": "1",
            "PIP_NO_INPUT": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


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


def spawn(argv: list[str], user: BuildUser, home: Path) -> Step:
    """Start one build step behind its gate; stdout and stderr come back merged on
    ``step.proc.stdout``."""
    setpriv = shutil.which("setpriv", path=SAFE_PATH)
    if setpriv is None:
        raise ConfigError("setpriv (util-linux) is not installed; builds need it")
    ids: dict[str, object] = {}
    if user.switch:
        ids = {"user": user.uid, "group": user.gid, "extra_groups": []}
    with _steps_lock:  # a sweep never sees the new group before it counts as running
        proc = subprocess.Popen(  # type: ignore[call-overload]
            [setpriv, "--pdeathsig", "KILL", "--", *GATE, *argv], cwd=home,
            env=scrubbed_env(user, home), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, close_fds=True, start_new_session=True, umask=0o022,
            **ids)
        _running.add(proc.pid)
    return Step(proc)


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
    uid: int

    @property
    def zombie(self) -> bool:
        return self.state == "Z"


def _proc(pid: int) -> Proc | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
        uid = os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None  # gone
    f = data[data.rindex(b")") + 2:].split()  # after "pid (comm) ": state is field 3
    return Proc(pid, f[0].decode(), int(f[1]), int(f[2]), int(f[19]), uid)


def _table() -> list[Proc]:
    procs = (_proc(int(e)) for e in os.listdir("/proc") if e.isdigit())
    return [p for p in procs if p is not None]


def start_time(pid: int) -> int | None:
    info = _proc(pid)
    return None if info is None else info.start


def _live_members(pgid: int) -> list[Proc]:
    return [p for p in _table() if p.pgrp == pgid and not p.zombie]


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
    for p in _table():
        if p.pgrp != pgid:
            continue
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


def _strays(uid: int) -> list[Proc]:
    """Processes of ``uid`` hanging below this process through ``uid`` processes only, in no
    running step's group (a daemon running as root in between, as in tests, is a boundary)."""
    me = os.getpid()
    table = {p.pid: p for p in _table()}
    out = []
    for p in table.values():
        if p.uid != uid or p.pgrp in _running:
            continue
        up: Proc | None = p
        hops = 0
        while up is not None and up.uid == uid and up.ppid != me and hops < 64:
            up, hops = table.get(up.ppid), hops + 1
        if up is not None and up.uid == uid and up.ppid == me:
            out.append(p)
    return out


def sweep(user: BuildUser) -> int:
    """Kill the build user's processes below us that belong to no running step; reap them.

    Returns how many were killed. Only with a dedicated build user: a daemon that builds as
    itself cannot tell its builds' strays from itself.
    """
    if not user.switch:
        return 0
    me, killed = os.getpid(), set()
    deadline = time.monotonic() + 2.0
    while True:
        with _steps_lock:  # no step is being spawned (and not yet counted) meanwhile
            strays = _strays(user.uid)
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
        if p.uid != uid or p.start < leader_start or (p.pid == pgid and p.start != leader_start):
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
