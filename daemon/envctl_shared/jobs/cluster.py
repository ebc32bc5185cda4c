"""Every host's jobs, seen from any host sharing the root: records in the root, one per job.

Why: daemons on several hosts (a Kubernetes DaemonSet) share one root, and a user asks whichever
daemon their server runs next to. Each daemon's SQLite store stays the source of truth for its
own jobs, on local disk (SQLite on NFS is not safe); what the others need to *see* is published
beside the env records, in the filesystem they already share:

- ``<root>/.envctl/jobs/<host>/<id>.json``: the job as ``Job.to_dict`` gives it, plus its host,
  written atomically (a temporary file renamed over) by the daemon that owns the job, on every
  change of state or phase. Only a regular file owned by the daemon's uid and writable by nobody
  else is believed (the same rule as the env records).
- ``<root>/.envctl/jobs/<host>.alive``: an fcntl open-file-description lock the host's daemon
  holds while it runs; NFSv4/EFS release it (after the lease) when the host dies. Readers ask
  with ``F_OFD_GETLK`` whether it is held: a host whose daemon is gone is *marked*
  (``host_alive: false``), its records kept — its queued or running jobs were interrupted, which
  its daemon will record when it comes back.

Build logs stay on the host that ran the build (they can be large, and the state dir is local);
another host answers a log request by naming the host that has it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import socket
import stat
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

from ..errors import EnvctlError
from ..heal.fsops import DIR_FLAGS
from . import layout
from .model import Job, State

log = logging.getLogger(__name__)

JOBS_DIR = "jobs"
ALIVE = ".alive"
MAX_RECORD = 256 << 10  # a job record: its fields, no spec, no log
FLOCK = "hhqqi4x"  # struct flock on Linux x86_64/aarch64: type, whence, start, len, pid
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def host_name() -> str:
    """This daemon's host as other daemons see it (the pod's name under Kubernetes)."""
    return socket.gethostname()


def _component(host: str) -> str:
    """The host as one safe path component (host names are letters, digits, '-' and '.')."""
    safe = _UNSAFE.sub("_", host).lstrip(".") or "_"
    return safe[:255]


class ClusterJobs:
    """This daemon's records in the root, and the other hosts' records read back."""

    def __init__(self, root: Path, host: str | None = None) -> None:
        self.root = root
        self.host = host or host_name()
        self._dir = _component(self.host)
        self._alive: int | None = None  # fd holding our liveness lock
        self._lock = threading.Lock()

    # -- our side ------------------------------------------------------------------------------

    def start(self) -> None:
        """Create our directory and take our liveness lock (a second daemon claiming the same
        host name gets no lock: it still publishes, and readers see the host alive)."""
        with self._area() as jobs:
            layout.checked_dir(jobs, self._dir, 0o755, f"{self.root}/.envctl/jobs/{self._dir}")
            fd = os.open(self._dir + ALIVE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600, dir_fd=jobs)
        try:
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack(FLOCK, fcntl.F_WRLCK, 0, 0, 0, 0))
        except OSError as exc:
            log.warning("jobs-cluster alive-lock host=%s error=%s", self.host, exc.strerror)
        self._alive = fd

    def stop(self) -> None:
        if self._alive is not None:
            os.close(self._alive)  # releases the lock: this host is no longer alive
            self._alive = None

    def publish(self, job: Job) -> None:
        """Write ``job``'s record, atomically; a failure is logged, never raised (the job
        itself does not depend on being visible elsewhere)."""
        data = json.dumps({**job.to_dict(), "host": self.host}).encode()
        tmp = f".tmp-{job.id}-{threading.get_ident()}"
        try:
            with self._area() as jobs:
                mine = os.open(self._dir, DIR_FLAGS, dir_fd=jobs)
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                             | os.O_CLOEXEC, 0o644, dir_fd=mine)
                try:
                    os.fchmod(fd, 0o644)  # whatever the umask: readable, written by us only
                    os.write(fd, data)
                finally:
                    os.close(fd)
                os.rename(tmp, f"{job.id}.json", src_dir_fd=mine, dst_dir_fd=mine)
            finally:
                os.close(mine)
        except Exception as exc:  # noqa: BLE001 - logged; a build must not fail for this
            log.warning("jobs-cluster publish job=%s error=%s", job.id, exc)

    # -- the other hosts -----------------------------------------------------------------------

    def others(self) -> list[Job]:
        """Every other host's jobs as their records say, each with its host and whether that
        host's daemon is alive."""
        found: list[Job] = []
        try:
            with self._area(create=False) as jobs:
                for entry in sorted(os.listdir(jobs)):
                    if entry == self._dir or entry.endswith(ALIVE) or entry.startswith("."):
                        continue
                    found.extend(self._host_jobs(jobs, entry))
        except (OSError, EnvctlError):  # no area yet, or one the daemon cannot trust
            return found
        return found

    def find(self, job_id: str) -> Job | None:
        """Another host's job by its id or a unique prefix of it (ids are random: unique across
        hosts). None when no other host has it, or the prefix is ambiguous."""
        hits = [j for j in self.others() if j.id == job_id or j.id.startswith(job_id.lower())]
        exact = [j for j in hits if j.id == job_id]
        return exact[0] if exact else hits[0] if len(hits) == 1 else None

    def _host_jobs(self, jobs: int, entry: str) -> Iterator[Job]:
        try:
            hdir = os.open(entry, DIR_FLAGS, dir_fd=jobs)
        except OSError:
            return
        try:
            if os.fstat(hdir).st_uid != os.geteuid():
                return  # not a daemon's directory
            alive = _held(jobs, entry + ALIVE)
            for name in os.listdir(hdir):
                if name.endswith(".json") and not name.startswith("."):
                    job = _read(hdir, name, alive)
                    if job is not None:
                        yield job
        finally:
            os.close(hdir)

    @contextlib.contextmanager
    def _area(self, create: bool = True) -> Iterator[int]:
        """The fd of ``<root>/.envctl/jobs`` (created, owner checked, never a symlink)."""
        with layout.RootArea(self.root).open() as fds:
            jobs = layout.checked_dir(fds["area"], JOBS_DIR, 0o755,
                                      f"{self.root}/.envctl/{JOBS_DIR}", create)
            try:
                yield jobs
            finally:
                os.close(jobs)


def _held(parent: int, name: str) -> bool | None:
    """Whether someone holds the lock on ``name`` (None: cannot tell)."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
    except FileNotFoundError:
        return False  # no lock file: no daemon of that host runs here
    except OSError:
        return None
    try:
        out = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, struct.pack(FLOCK, fcntl.F_WRLCK, 0, 0, 0, 0))
    except OSError:
        return None
    finally:
        os.close(fd)
    return struct.unpack(FLOCK, out)[0] != fcntl.F_UNLCK


def _read(hdir: int, name: str, alive: bool | None) -> Job | None:
    """A record, if the daemon wrote it (owner, mode) and it parses; else None."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=hdir)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if (not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022
                or st.st_size > MAX_RECORD):
            return None
        raw = b""
        while chunk := os.read(fd, MAX_RECORD + 1 - len(raw)):  # NFS may return less
            raw += chunk
        d = json.loads(raw)
        req = d["requester"]
        return Job(id=str(d["id"]), name=str(d["name"]), state=State(d["state"]),
                   phase=d.get("phase"), backend=str(d["backend"]),
                   requester_uid=int(req["uid"]), requester_gid=int(req["gid"]),
                   requester_groups=tuple(int(g) for g in req["groups"]),
                   requester_name=str(req["name"]), claimed_user=d.get("claimed_user"),
                   replace=bool(d.get("replace")), created_at=float(d["created_at"]),
                   started_at=d.get("started_at"), finished_at=d.get("finished_at"),
                   prefix=str(d["prefix"]), exit_detail=d.get("exit_detail"),
                   log_path=str(d.get("log_path", "")), hub_user=d.get("hub_user"),
                   host=str(d["host"]), host_alive=alive)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    finally:
        os.close(fd)
