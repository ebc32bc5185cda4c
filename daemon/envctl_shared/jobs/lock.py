"""One build per env name at a time, also across daemons on different hosts sharing the root.

Why ``fcntl.lockf`` on a file in the root: POSIX record locks go through the NFS lock manager
(NFSv4 and EFS honour them), so two daemons on two hosts serialise on the same file, and the
kernel (or the NFS server's lease) releases a lock whose holder died — a ``kill -9`` leaves no
stale lock. The holder writes ``host pid job`` into the file so a refusal can name who holds it.

Two traps this module exists to avoid:
- POSIX locks belong to the *process*: a second ``open``+``close`` of the same file anywhere in
  the daemon silently drops the lock. So each name has at most one open fd in this process,
  tracked in a table; a second acquire of a name held here fails without touching the file.
- the fd must never reach a build: it is opened ``O_CLOEXEC`` (and builds are spawned with
  ``close_fds``), so a build that outlives its job cannot keep the name locked.

Policy across daemons (decided): no waiting. If another daemon holds the name, the job fails at
once with a message naming that daemon's host and pid; the user retries when it is done. A
waiting job would hold a build slot for an unbounded time on another host's say-so.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import threading

from ..errors import Conflict

_HELD: dict[tuple[str, str], int] = {}  # (root, name) -> fd, for this whole process
_TABLE_LOCK = threading.Lock()


class NameLock:
    """The lock on one env name in one root; ``release`` is idempotent."""

    def __init__(self, locks_fd: int, root: str, name: str, job_id: str) -> None:
        self.key = (root, name)
        self.name = name
        self.job_id = job_id
        self._locks_fd = locks_fd
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock without waiting; Conflict names the holder when it is taken."""
        with _TABLE_LOCK:
            if self.key in _HELD:
                raise Conflict(f"a build of {self.name!r} is already running in this daemon")
            fd = os.open(f"{self.name}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o644, dir_fd=self._locks_fd)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = os.pread(fd, 256, 0).decode("utf-8", "replace").strip() or "unknown"
                os.close(fd)
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                raise Conflict(f"another envctl daemon is building {self.name!r} "
                               f"(lock holder: {holder})",
                               hint="retry when that build has finished") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{socket.gethostname()} {os.getpid()} {self.job_id}\n".encode(), 0)
            _HELD[self.key] = fd
            self._fd = fd

    def release(self) -> None:
        with _TABLE_LOCK:
            if self._fd is None:
                return
            os.ftruncate(self._fd, 0)
            fcntl.lockf(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            del _HELD[self.key]
            self._fd = None
