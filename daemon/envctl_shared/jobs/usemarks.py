"""What is in use: a mark per version that running kernels hold, so GC knows use, not just time.

Why: GC removed a version while a kernel still ran from it (its next import failed). A running
process leaves nothing GC could see: the stable path ``<root>/<name>`` already points elsewhere.
So each version has a *mark*, ``.envctl/envs/<name>/vN.use`` beside it: an empty file the daemon
creates (its own, 0644) when the version becomes current (``create``, from ``envs.switch``).

- Our kernel launcher (``kernels._VARIABLES``) opens the mark of the version it resolved,
  read-only, takes a *shared* lock on it (``envctl_shared.locks``: an OFD record lock) and keeps
  the fd across its ``exec`` into the kernel: the lock lives exactly as long as the kernel (and
  any child that inherited the fd), and the kernel (or the NFS server's lease, on another host)
  drops it when the process ends, ``kill -9`` included. It also reads one byte: under
  ``relatime`` (Linux's default) that stamps the mark's atime — the moment of use.
- GC asks :func:`in_use` before removing a collectable version: a held mark (any host: record
  locks go through NFS's lock manager and EFS) keeps it, and so does a use within ``gc_grace``
  (the grace counts from the last use: the latest of the atime stamped at acquire and the mtime
  the daemon stamps whenever it finds the mark held; a new mark says "never used").

Limits: a process that is not our kernel launcher (``conda activate`` in a terminal, a script
run by its path) takes no mark; such a use is protected by the time-based grace only. On a
filesystem mounted ``noatime`` (or one that never updates atime, as EFS may not), the last use is
the last time GC saw the mark held. A member can open a mark (so it can take the shared lock a
kernel takes) and hold it for ever: that keeps the version from GC — the daemon never locks a
mark itself, so no rollback or remove waits for one. The hard cap on versions per env
(``requests.max_versions``) bounds what held marks can keep: a build that finds every old
version held fails at once, naming who holds them (``holders``), rather than adding one more.
"""

from __future__ import annotations

import contextlib
import os
import stat
import time

from .. import locks

SUFFIX = ".use"
MODE = 0o644  # everyone who may run the version may mark it


def mark_name(version: str) -> str:
    return version + SUFFIX


def create(env_fd: int, version: str) -> None:
    """The mark of ``version`` (in its env's directory), made if missing: the daemon's own,
    stamped "never used" (time 0: a launcher's first read stamps its atime, see ``in_use``)."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(mark_name(version), flags | os.O_CREAT | os.O_EXCL, MODE, dir_fd=env_fd)
        new = True
    except FileExistsError:
        fd = os.open(mark_name(version), flags, dir_fd=env_fd)
        new = False
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) != MODE:
            os.fchmod(fd, MODE)  # the umask took bits away
        if new:
            os.utime(fd, (0, 0))
    finally:
        os.close(fd)


def forget(env_fd: int, version: str) -> None:
    """Remove the mark with its version."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(mark_name(version), dir_fd=env_fd)


def holders(env_fd: int, version: str) -> str:
    """Who holds ``version``'s mark, for a message: the processes of this host
    (``locks.local_holders``), else "a process on another host"."""
    try:
        fd = os.open(mark_name(version), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
                     | os.O_NONBLOCK, dir_fd=env_fd)
    except OSError:
        return "no process any more"
    try:
        found = locks.local_holders(fd)
    finally:
        os.close(fd)
    return ", ".join(h.describe() for h in found[:3]) or "a process on another host"


def in_use(env_fd: int, version: str, grace: float, now: float | None = None) -> bool:
    """Whether a process holds ``version``'s mark now (then its last use is stamped: now), or
    used it less than ``grace`` seconds ago. A version without a mark (built before marks
    existed, never current since) has only its time-based grace."""
    now = time.time() if now is None else now
    try:
        fd = os.open(mark_name(version), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
                     | os.O_NONBLOCK, dir_fd=env_fd)
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            return False  # not the daemon's mark: nothing anyone could have locked for real
        if locks.is_locked(fd):
            os.utime(fd, (now, now))
            return True
        last = max(st.st_atime, st.st_mtime)
        if st.st_atime > st.st_mtime:  # stamped by a launcher: keep it, and let the next
            os.utime(fd, (last, last))  # read stamp again (relatime: atime <= mtime)
        return now - last < grace
    finally:
        os.close(fd)
