"""One poller per root, cluster-wide: daemons sharing a root elect the one that polls it.

Why: on a Kubernetes DaemonSet every node runs a daemon on the same EFS root. Each must heal its
own node's writes (its inotify sees only those), but only one needs to poll the whole root for
other hosts' writes and run the periodic full passes; twenty pollers are twenty times the
metadata operations EFS meters and throttles, for the work of one.

How: through the filesystem the daemons already share, with no service of its own. The daemon
that holds a write lock on ``<root>/.envctl/poller.lock`` polls; the others try to take it once
per ``poll_interval``. The lock is the daemon's one primitive (``envctl_shared.locks``): a
record lock that NFSv4 and EFS hold for the client with a lease and release when the holder
dies (after the lease on NFS; at once locally and through FUSE).
Before every pass the leader asserts its lock again: on NFS that is a LOCK call to the server,
so a leader whose lease expired (another daemon may hold the lock by now) or whose filesystem is
gone learns it there and stops polling at once. Takeover therefore comes within one
``poll_interval`` of the lock being released, plus the lease on NFS.

The leader writes who it is and since when to ``poller.json`` beside the lock (atomically, by
rename) so that every daemon's ``status`` can say which host polls. The lock file is the
daemon's, 0600: a member of the root's group who could open it could hold a read lock and stop
every daemon from polling.

A daemon that cannot create the lock file at all (a read-only root, root squashed on EFS)
cannot coordinate: it polls alone, as before elections existed, and says so once.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from ..errors import FilesystemError
from ..jobs.cluster import host_name
from ..jobs.layout import AREA, checked_dir
from ..locks import LockFile, is_locked
from ..logfields import Subject

log = logging.getLogger(__name__)

LOCK_FILE = "poller.lock"
RECORD_FILE = "poller.json"
# The root cannot host a lock at all: coordinate with nobody, poll as a lone daemon does.
_STANDALONE_ERRNOS = {errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT}


class PollerLease:
    """This daemon's side of the election for one root.

    ``may_poll`` is the only hot call: the root's maintenance thread asks it before every poll
    and full pass, and it answers from one lock call."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._log = Subject(log, root=root)  # every line names its root once
        self.host = host_name()
        self.role = "starting"  # leader | follower | standalone | unreachable
        self.since: float | None = None  # wall clock when this daemon became the leader
        self.error: str | None = None  # why the lock cannot be taken or was lost
        self._file: LockFile | None = None
        self._lock = threading.Lock()

    # -- the election ------------------------------------------------------------------------

    def may_poll(self) -> bool:
        """True when this daemon is to poll now: it holds the lock (taken now, or asserted
        again), or no lock can exist on this root. False: another daemon polls, or this one
        cannot reach the root (then nobody here polls until it can)."""
        with self._lock:
            if self.role == "standalone":
                return True
            try:
                lock = self._open()
            except OSError as exc:
                if exc.errno in _STANDALONE_ERRNOS:
                    self._set("standalone", f"lock file cannot be created: {exc.strerror}")
                    return True
                self._set("unreachable", f"{exc.strerror}")
                return False
            except FilesystemError as exc:  # .envctl tampered with: never trust it
                self._set("standalone", exc.message)
                return True
            try:
                mine = lock.assert_held()
            except OSError as exc:
                self._drop()  # the next attempt opens afresh (a remounted filesystem)
                self._set("unreachable", exc.strerror)
                return False
            if not mine:
                self._set("follower", None)
                return False
            if self.role != "leader":
                self.since = time.time()
                self._set("leader", None)
                self._write_record()
            return True

    def close(self) -> None:
        """Give the lock up (the daemon stops or the root is no longer watched)."""
        with self._lock:
            self._drop()
            if self.role == "leader":
                self.role = "follower"

    # -- what status shows -------------------------------------------------------------------

    def status(self, fresh: bool = True) -> dict[str, Any]:
        """This daemon's role and the leader's host and since-when (a follower reads the
        leader's record now: ``leader`` is null when it cannot; with ``fresh`` off, for the
        periodic STATUS= line, it does not, since every read is a few round trips on NFS)."""
        with self._lock:
            mine = {"role": self.role, "host": self.host, "error": self.error}
            if self.role == "leader":
                return {**mine, "leader": {"host": self.host, "pid": os.getpid(),
                                           "since": self.since}}
        return {**mine, "leader": self._read_record() if fresh else None}

    # -- files -------------------------------------------------------------------------------

    def _set(self, role: str, error: str | None) -> None:
        if role != self.role:
            level = logging.WARNING if role in ("standalone", "unreachable") or (
                self.role == "leader") else logging.INFO
            self._log.log(level, "poller role role=%s was=%s host=%s error=%s", role, self.role,
                          self.host, error or "")
        if role != "leader":
            self.since = None
        self.role = role
        self.error = error

    def _open(self) -> LockFile:
        """The lock file, opened once and kept: the lock lives with this open (the daemon's
        own file, see ``locks.LockFile``)."""
        if self._file is not None:
            return self._file
        root = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            area = checked_dir(root, AREA, 0o755, f"{self.root}/{AREA}")
        finally:
            os.close(root)
        try:
            lock = LockFile(area, LOCK_FILE, f"{self.root}/{AREA}/{LOCK_FILE}")
            lock.open()
        finally:
            os.close(area)
        self._file = lock
        return lock

    def _drop(self) -> None:
        """Close the lock file: that releases the lock if this daemon held it (and, after a
        lost lease or a lost filesystem, gives the next attempt a fresh open)."""
        if self._file is not None:
            self._file.release()
            self._file = None

    def _write_record(self) -> None:
        data = json.dumps({"host": self.host, "pid": os.getpid(), "since": self.since})
        try:
            area = os.open(self.root / AREA, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                           | os.O_CLOEXEC)
            try:
                tmp = f".{RECORD_FILE}.{self.host}.{os.getpid()}"
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                             | os.O_CLOEXEC, 0o600, dir_fd=area)
                try:
                    os.fchmod(fd, 0o600)  # the daemons' alone, as every state file
                    os.write(fd, data.encode())
                finally:
                    os.close(fd)
                os.rename(tmp, RECORD_FILE, src_dir_fd=area, dst_dir_fd=area)
            finally:
                os.close(area)
        except OSError as exc:  # status then says less; the election itself is the lock
            self._log.warning("poller record not written error=%s", exc.strerror)

    def _read_record(self) -> dict[str, Any] | None:
        try:
            area = os.open(self.root / AREA, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                           | os.O_CLOEXEC)
            try:
                fd = os.open(RECORD_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                             dir_fd=area)
            finally:
                os.close(area)
            try:
                st = os.fstat(fd)
                if st.st_uid != os.geteuid() or st.st_mode & 0o022:
                    return None  # only a daemon's record is believed
                data = json.loads(os.read(fd, 4096) or b"null")
            finally:
                os.close(fd)
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict):
            return None
        return {"host": str(data.get("host")), "pid": data.get("pid"),
                "since": data.get("since"), "held": self._held()}

    def _held(self) -> bool | None:
        """Whether any daemon holds the lock now (the record may be a dead leader's)."""
        with self._lock:
            fd = None if self._file is None else self._file.fd
            if fd is None:
                return None
            try:
                return is_locked(fd)
            except OSError:
                return None
