"""One build per env name at a time, also across daemons on different hosts sharing the root.

Why a lock file in the root: record locks go through the NFS lock manager (NFSv4 and EFS honour
them), so two daemons on two hosts serialise on the same file, and the kernel (or the NFS
server's lease) releases a lock whose holder died — a ``kill -9`` leaves no stale lock. The lock
is the daemon's one primitive (``envctl_shared.locks``: an OFD lock, which no other open of the
file in this process can drop, and which conflicts with a second open here like with another
process). The file ``.envctl/locks/<name>.lock`` is 0600 in the 0700 ``locks`` directory: no
member can open it, so none can hold it and keep replace, rollback, remove or GC of the name
waiting; the holder writes who it is into it, so a refusal can name the holder — this daemon,
another daemon (host, pid, job), or, for a lock file left open to members by an older daemon,
the process on this host that holds it (``locks.LockFile`` replaces such a file at once).

The fd never reaches a build: it is opened ``O_CLOEXEC`` (and builds are spawned with
``close_fds``), so a build that outlives its job cannot keep the name locked.

Policy across daemons (decided): no waiting. If another daemon holds the name, the job fails at
once with a message naming that daemon's host and pid; the user retries when it is done. A
waiting job would hold a build slot for an unbounded time on another host's say-so.
"""

from __future__ import annotations

import logging
import os

from ..errors import Conflict, EnvctlError
from ..locks import LockFile

log = logging.getLogger(__name__)


class NameLock:
    """The lock on one env name in one root; ``release`` is idempotent."""

    def __init__(self, locks_fd: int, root: str, name: str, job_id: str) -> None:
        self.name = name
        self.job_id = job_id
        self._file = LockFile(locks_fd, f"{name}.lock", f"{root}/.envctl/locks/{name}.lock")

    def acquire(self) -> None:
        """Take the lock without waiting; Conflict names the holder when it is taken."""
        by = self._file.acquire(self.job_id)
        if by is None:
            return
        if by.here:
            raise Conflict(f"{self.name!r} is busy in this daemon ({by.what or 'busy'})",
                           hint="retry when that has finished")
        if by.daemon:
            raise Conflict(f"another envctl daemon is using {self.name!r}: {by.describe()}",
                           hint="retry when that build or change has finished")
        raise Conflict(f"{self.name!r} cannot be locked: {self._file.shown} is held by "
                       f"{by.describe()}, not by an envctl daemon",
                       hint="an administrator can stop that process (it cannot have opened "
                            "the file since this daemon started)")

    def release(self) -> None:
        self._file.release()


def secure_all(locks_fd: int, root: str) -> None:
    """At start: every name lock file left open to others (by an older daemon) is made the
    daemon's alone now — replaced by a fresh inode, or closed to new openers while a daemon
    holds it (``locks.LockFile``) — instead of at the name's next use."""
    for entry in os.listdir(locks_fd):
        if entry.endswith(".lock") and not entry.startswith("."):
            try:
                LockFile(locks_fd, entry, f"{root}/.envctl/locks/{entry}").release_after_open()
            except (OSError, EnvctlError) as exc:  # its name's next use says so again
                log.warning("lock-file unusable path=%s/.envctl/locks/%s error=%s", root,
                            entry, exc)
