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
- a scrubbed environment: only PATH, HOME/TMPDIR (the job's own dir), LANG and a few tool
  switches; nothing of the daemon's environment (tokens, proxies, SSH agents) leaks in.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import RequestsConfig
from ..errors import ConfigError

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
    """A spawned build step, held at its gate until :meth:`release`."""

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


def spawn(argv: list[str], user: BuildUser, home: Path) -> Step:
    """Start one build step behind its gate; stdout and stderr come back merged on
    ``step.proc.stdout``."""
    setpriv = shutil.which("setpriv", path=SAFE_PATH)
    if setpriv is None:
        raise ConfigError("setpriv (util-linux) is not installed; builds need it")
    ids: dict[str, object] = {}
    if user.switch:
        ids = {"user": user.uid, "group": user.gid, "extra_groups": []}
    proc = subprocess.Popen(  # type: ignore[call-overload]
        [setpriv, "--pdeathsig", "KILL", "--", *GATE, *argv], cwd=home,
        env=scrubbed_env(user, home), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, close_fds=True, start_new_session=True, umask=0o022, **ids)
    return Step(proc)


def _stat_fields(pid: int) -> tuple[int, int] | None:
    """(pgrp, start time in clock ticks) of ``pid`` from /proc, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2:].split()
    return int(fields[2]), int(fields[19])  # pgrp is field 5, starttime field 22


def start_time(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return None if fields is None else fields[1]


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def kill_group(pgid: int, grace: float = KILL_GRACE,
               leader: subprocess.Popen[bytes] | None = None) -> None:
    """SIGTERM the whole group, then SIGKILL whatever is left after ``grace`` seconds.

    ``leader`` is reaped while waiting: an unreaped zombie would keep the group "alive".
    """
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if leader is not None:
                leader.poll()
            if not group_alive(pgid):
                return
            time.sleep(0.05)


def _members(pgid: int) -> list[tuple[int, int, int]]:
    """(pid, uid, start time) of every process in group ``pgid``."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields is None or fields[0] != pgid:
            continue
        try:
            uid = os.stat(f"/proc/{entry}").st_uid
        except OSError:
            continue
        out.append((int(entry), uid, fields[1]))
    return out


def kill_orphans(pgid: int, leader_start: int, uid: int) -> int:
    """Kill a build group a dead daemon left behind; return how many processes it had.

    The group is ours only if every member runs as the build uid and started no earlier than
    the recorded leader, and the leader (if still there) is the very process we started.
    """
    members = _members(pgid)
    if not members:
        return 0
    for pid, puid, started in members:
        if puid != uid or started < leader_start or (pid == pgid and started != leader_start):
            return 0
    deadline = time.monotonic() + 5.0
    while _members(pgid) and time.monotonic() < deadline:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    return len(members)
