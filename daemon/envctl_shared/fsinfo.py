"""Which filesystem a path lives on (from /proc/self/mountinfo), and whether a path is safe.

Why: two decisions depend on it. inotify is blind to other clients' writes on network and FUSE
filesystems, so the watcher must add polling there; and every metadata call is a round trip
there, so walks should be concurrent. On a local disk neither is worth its cost. (Whether an
entry is on the root's mount is not decided here: the healer compares ``statx`` mount ids.)

``first_symlink`` is the one check that a configured or typed path is named without a symlink
(a root in the config, a path given to ``envctl heal``): through a link, a root could overlap
another unseen, and the link's owner would choose what root's writes reach.
"""

from __future__ import annotations

import os
import select
import stat
import threading
from pathlib import Path
from typing import NamedTuple

# Filesystem types where inotify misses writes made elsewhere and metadata calls are remote.
REMOTE_TYPES = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "ceph", "glusterfs", "lustre", "gpfs", "beegfs",
    "9p", "afs", "ocfs2", "gfs2", "virtiofs", "fuse", "fuseblk", "efs",
})
LOCAL_CONCURRENCY = 1
REMOTE_CONCURRENCY = 16


class MountInfo(NamedTuple):
    """The mount a path is on: its mount point and filesystem type (``fuse.bindfs``, ``nfs4``)."""

    mount_point: str
    fstype: str

    @property
    def remote(self) -> bool:
        """True for network and FUSE filesystems (``fuse.*`` counts: bindfs, sshfs, s3fs...)."""
        return self.fstype in REMOTE_TYPES or self.fstype.startswith("fuse.")


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal (``\\040``)."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


class MountWatch:
    """The mount table of this process, re-read only when the kernel says it changed.

    Why: ``mount_of`` is asked for every walk, and re-reading the table each time would cost
    more than a small walk; /proc/self/mountinfo raises POLLPRI when the table changes, so
    one ``poll`` per call tells whether the cached copy is still good.
    """

    def __init__(self, mountinfo: str = "/proc/self/mountinfo") -> None:
        self._fh = open(mountinfo, "rb", buffering=0)  # noqa: SIM115 (kept open: polled)
        self._poll = select.poll()
        self._poll.register(self._fh.fileno(), select.POLLPRI | select.POLLERR)
        self._lock = threading.Lock()
        self._poll.poll(0)  # consume the event pending since open
        self._mounts = self._read()

    def _read(self) -> tuple[MountInfo, ...]:
        self._fh.seek(0)
        chunks = []
        while chunk := self._fh.read(65536):
            chunks.append(chunk)
        mounts = []
        for line in b"".join(chunks).decode("utf-8", "replace").splitlines():
            fields = line.split()
            if fields:
                mounts.append(MountInfo(_unescape(fields[4]), fields[fields.index("-") + 1]))
        return tuple(mounts)

    def mounts(self) -> tuple[MountInfo, ...]:
        """The current table (re-read when the kernel signalled a change)."""
        with self._lock:
            if self._poll.poll(0):
                self._mounts = self._read()
            return self._mounts


_watch: MountWatch | None = None
_watch_lock = threading.Lock()


def _table() -> tuple[MountInfo, ...]:
    """The process-wide MountWatch's table (the watch is created on first use)."""
    global _watch
    with _watch_lock:
        if _watch is None:
            _watch = MountWatch()
    return _watch.mounts()


def mount_of(path: str | os.PathLike[str]) -> MountInfo:
    """The innermost mount containing ``path`` (resolved), by longest mount-point prefix."""
    target = os.path.realpath(path)
    best = MountInfo("/", "unknown")
    for m in _table():
        point = m.mount_point
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best.mount_point):
            best = m
    return best


def walk_concurrency(path: str | os.PathLike[str], configured: int | None = None) -> int:
    """Threads for a walk under ``path``: ``configured`` (default 16) on network and FUSE
    filesystems; 1 on local disks, whatever is configured.

    Why local walks stay serial: there each metadata call takes microseconds, so threads buy
    no overlap and only add GIL hand-offs — measured here 1.2-2x slower than one thread
    (bench/results/heal.md). On NFS/EFS every call is a round trip and threads are the win.
    """
    try:
        remote = mount_of(path).remote
    except OSError:
        remote = False
    return (configured or REMOTE_CONCURRENCY) if remote else LOCAL_CONCURRENCY


_PATH_DIR = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def first_symlink(path: Path, base: Path = Path("/")) -> Path | None:
    """The first component of the absolute ``path`` below ``base`` that is a symlink, or None.

    Each directory is looked at through an ``O_PATH|O_NOFOLLOW`` fd of its parent (never by
    re-resolving a path string, which a rename racing the look could redirect). The look stops
    (None) at a component that does not exist, is no directory, or cannot be looked at: what
    uses the path reports that itself."""
    try:
        fd = os.open(base, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        here = base
        for part in path.relative_to(base).parts:
            here = here / part
            st = os.stat(part, dir_fd=fd, follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                return here
            if not stat.S_ISDIR(st.st_mode):
                return None
            nxt = os.open(part, _PATH_DIR, dir_fd=fd)
            os.close(fd)
            fd = nxt
    except OSError:
        return None
    finally:
        os.close(fd)
    return None
