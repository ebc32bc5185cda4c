"""The daemon's one lock primitive: open-file-description (OFD) record locks, typed.

Why OFD locks, and only them (before there were three kinds: ``lockf`` with a process-global
table, ``flock``, and OFD through a ``struct flock`` packed by hand in two modules):

- an OFD lock (``F_OFD_SETLK``) belongs to the *open file description*, not to the process: no
  other ``open``/``close`` of the same file anywhere in the daemon can drop it (the trap of
  classic ``lockf`` locks, which a table of fds per process had to avoid), and two opens in one
  process conflict like two processes do, so "already held here" needs no table either;
- it is a POSIX record lock: NFS (v3 through lockd, v4 and EFS in the protocol) and FUSE pass it
  to the server, so daemons — and kernels, see ``jobs.usemarks`` — on several hosts sharing a
  root see each other's locks, and the server drops the lock of a client that died (after its
  lease); locally the kernel drops it with the last fd, ``kill -9`` included: no stale lock;
- ``flock(2)`` does not conflict with record locks on a local filesystem: mixing the kinds lets
  two holders both "hold" one file.

The kernel names no holder of an OFD lock (``F_OFD_GETLK`` and ``/proc/locks`` say pid -1). So a
daemon that takes an exclusive lock writes who it is into the lock file (:class:`Holder`, one
JSON line), and a refusal reads it back; a holder that wrote nothing (a user holding a lock on a
file it could open) is looked up in ``/proc/*/fdinfo`` on this host (pid and uid; on another
host it stays unknown). The daemon's lock files are its own: 0600 in directories only it can
enter (``LockFile``), so that no member can hold one and stop builds, GC or polling; a lock file
with another mode or owner (left by an older daemon, or planted) is replaced by a fresh inode
unless a daemon holds it right now, which leaves any member's lock on the old inode, harmless.

Layout assumed by :data:`_FLOCK`: ``struct flock`` of Linux with a 64-bit ``off_t`` (x86_64,
aarch64): type, whence, start, len, pid.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import fcntl
import json
import logging
import os
import secrets
import socket
import stat
import struct
from dataclasses import dataclass

from .errors import FilesystemError

log = logging.getLogger(__name__)

_FLOCK = "hhqqi4x"
F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)
F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)
LOCK_FILE_MODE = 0o600
_BUSY = (errno.EAGAIN, errno.EACCES)
MAX_HOLDER = 1024  # bytes of a holder line read back


class Kind(enum.IntEnum):
    """A lock's kind: any number of shared holders, or one exclusive holder."""

    SHARED = fcntl.F_RDLCK
    EXCLUSIVE = fcntl.F_WRLCK


def _flock(kind: int) -> bytes:
    return struct.pack(_FLOCK, kind, os.SEEK_SET, 0, 0, 0)  # the whole file


def try_lock(fd: int, kind: Kind) -> bool:
    """Take ``kind`` on the whole file without waiting: True when taken (or converted: the
    same open file description may change its kind), False when someone else holds a
    conflicting lock; any other failure (EBADF for an exclusive lock on a read-only fd, ENOLCK,
    ENOTCONN of a lost filesystem) raises."""
    try:
        fcntl.fcntl(fd, F_OFD_SETLK, _flock(kind))
    except OSError as exc:
        if exc.errno in _BUSY:
            return False
        raise
    return True


def is_locked(fd: int, kind: Kind = Kind.EXCLUSIVE) -> bool:
    """Whether another open file description holds a lock that conflicts with ``kind`` (the
    default: any lock at all)."""
    out = fcntl.fcntl(fd, F_OFD_GETLK, _flock(kind))
    return bool(struct.unpack(_FLOCK, out)[0] != fcntl.F_UNLCK)


@dataclass(frozen=True)
class Holder:
    """Who holds a lock, as far as can be known: what a daemon wrote into the lock file, or a
    process found on this host. Every field may be unknown (None)."""

    host: str | None = None
    pid: int | None = None
    uid: int | None = None
    what: str | None = None  # the job or operation of a daemon holder
    daemon: bool = False  # the line was written by a daemon (only a daemon can write it)

    @property
    def here(self) -> bool:
        """This very process holds it (through another open of the file)."""
        return self.daemon and self.pid == os.getpid() and self.host == socket.gethostname()

    def describe(self) -> str:
        """For messages: 'envctld on hostA (pid 12, abc)', 'process 42 (uid 1001) on this
        host', or 'an unknown holder (...)'."""
        if self.daemon:
            what = f", {self.what}" if self.what else ""
            return f"envctld on {self.host or 'an unknown host'} (pid {self.pid}{what})"
        if self.pid is not None:
            uid = f" (uid {self.uid})" if self.uid is not None else ""
            return f"process {self.pid}{uid} on this host"
        return "an unknown holder (not a daemon of this host; maybe a process on another host)"

    def line(self) -> bytes:
        return (json.dumps({"host": self.host, "pid": self.pid, "uid": self.uid,
                            "what": self.what}) + "\n").encode()

    @classmethod
    def me(cls, what: str | None) -> Holder:
        return cls(socket.gethostname(), os.getpid(), os.geteuid(), what, daemon=True)


def _parse(raw: bytes) -> Holder | None:
    """A holder line a daemon wrote (JSON; an older daemon's ``host pid job`` too)."""
    text = raw.decode("utf-8", "replace").strip()
    if not text:
        return None
    try:
        d = json.loads(text)
    except ValueError:
        parts = text.split()
        pid = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None
        return Holder(parts[0][:255], pid, None, " ".join(parts[2:])[:255] or None, True)
    if not isinstance(d, dict):
        return None
    pid, uid = d.get("pid"), d.get("uid")
    return Holder(str(d.get("host"))[:255], pid if isinstance(pid, int) else None,
                  uid if isinstance(uid, int) else None,
                  str(d["what"])[:255] if d.get("what") else None, True)


def local_holders(fd: int) -> list[Holder]:
    """Processes of this host holding a lock on the file of ``fd``, from ``/proc/*/fdinfo``
    (OFD and POSIX locks alike; readable by root, or of one's own processes otherwise)."""
    st = os.fstat(fd)
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    found: dict[int, Holder] = {}
    for pid_name in os.listdir("/proc"):
        if not pid_name.isdigit() or int(pid_name) in found:
            continue
        try:
            names = os.listdir(f"/proc/{pid_name}/fdinfo")
        except OSError:
            continue
        for name in names:
            try:
                with open(f"/proc/{pid_name}/fdinfo/{name}", encoding="ascii",
                          errors="replace") as fh:
                    info = fh.read(4096)
            except OSError:
                continue
            if f" {dev} " in info and "lock:" in info:
                pid = int(pid_name)
                try:
                    uid = os.stat(f"/proc/{pid_name}").st_uid
                except OSError:
                    uid = None
                found[pid] = Holder(None, pid, uid)
                break
    return list(found.values())


def holder(fd: int) -> Holder:
    """Who holds the lock on the file of ``fd``: the daemon whose line the file holds, else a
    local process holding it, else unknown."""
    written = _parse(os.pread(fd, MAX_HOLDER, 0))
    if written is not None:
        return written
    here = local_holders(fd)
    return here[0] if here else Holder()


def _true_holder(fd: int) -> Holder:
    """``holder``, not believing a daemon's line that this host's processes contradict: the
    line of a daemon killed before it could clear it stays in the file, and whoever holds the
    lock now may be anybody."""
    by = holder(fd)
    if not by.daemon:
        return by
    here = local_holders(fd)
    if any(h.uid != os.geteuid() for h in here) or (
            not here and by.host == socket.gethostname()):
        return here[0] if here else Holder()
    return by


class LockFile:
    """One of the daemon's lock files, ``name`` in the directory ``dir_fd``: created 0600,
    never through a symlink, replaced when it is not safely the daemon's (see the module
    docstring). ``acquire`` takes it exclusively without waiting and writes this daemon as
    its holder; ``release`` (idempotent) clears the line and lets go."""

    def __init__(self, dir_fd: int, name: str, shown: str) -> None:
        self._dir = dir_fd
        self.name = name
        self.shown = shown  # the path as messages show it
        self.fd: int | None = None
        self._wrote = False  # this holder's line is in the file

    def open(self) -> int:
        """The fd of the lock file (kept open: the lock lives with it)."""
        if self.fd is None:
            self.fd = self._open_safe()
        return self.fd

    def _open_raw(self) -> int:
        try:
            fd = os.open(self.name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
                         | os.O_NONBLOCK, LOCK_FILE_MODE, dir_fd=self._dir)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
                raise FilesystemError(f"{self.shown} is not a regular file ({exc.strerror})",
                                      hint="someone tampered with it: remove it") from None
            raise
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise FilesystemError(f"{self.shown} is not a regular file",
                                  hint="someone tampered with it: remove it")
        return fd

    def _open_safe(self) -> int:
        fd = self._open_raw()
        st = os.fstat(fd)
        if st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) == LOCK_FILE_MODE:
            return fd
        # Not safely ours: someone else may have it open (and locked, or lock it later).
        by = _true_holder(fd) if is_locked(fd) else None
        if st.st_uid == os.geteuid() and by is not None and by.daemon:
            os.fchmod(fd, LOCK_FILE_MODE)  # an (older) daemon holds it: no new opener now
            log.warning("lock-file mode-fixed path=%s mode=%04o held_by=%s", self.shown,
                        stat.S_IMODE(st.st_mode), by.describe())
            return fd
        os.close(fd)
        tmp = f".{self.name}.{secrets.token_hex(4)}"
        new = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                      LOCK_FILE_MODE, dir_fd=self._dir)
        try:
            os.fchmod(new, LOCK_FILE_MODE)
            os.rename(tmp, self.name, src_dir_fd=self._dir, dst_dir_fd=self._dir)
        except BaseException:
            os.close(new)
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=self._dir)
            raise
        log.warning("lock-file replaced path=%s uid=%d mode=%04o held_by=%s", self.shown,
                    st.st_uid, stat.S_IMODE(st.st_mode), by.describe() if by else "nobody")
        return new

    def release_after_open(self) -> None:
        """Open (making the file safe, see ``open``) and close again."""
        self.open()
        self.release()

    def acquire(self, what: str | None = None) -> Holder | None:
        """Take the lock exclusively; None when taken, else who holds it."""
        fd = self.open()
        if not try_lock(fd, Kind.EXCLUSIVE):
            by = holder(fd)
            self.fd = None
            os.close(fd)
            return by
        os.ftruncate(fd, 0)
        os.pwrite(fd, Holder.me(what).line(), 0)
        self._wrote = True
        return None

    def assert_held(self) -> bool:
        """Take (or assert again) the lock: on NFS a call to the server, so a holder whose
        lease expired learns it here. False: someone else holds it."""
        return try_lock(self.open(), Kind.EXCLUSIVE)

    def release(self) -> None:
        """Let go, closing the file (idempotent)."""
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        if self._wrote:
            self._wrote = False
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
        with contextlib.suppress(OSError):  # a lost filesystem: the fd is closed all the same
            os.close(fd)  # the lock goes with the last fd of its open file description

