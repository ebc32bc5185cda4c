"""One cluster: every daemon sharing a root answers for every job — its state, its log, cancel.

Why: daemons on several hosts (a Kubernetes DaemonSet) share one root, and a user asks whichever
daemon their server runs next to (a user's pod usually cannot reach another node's socket).
Each daemon's SQLite store stays the source of truth for its own jobs, on local disk (SQLite on
NFS is not safe); what the others need is published in the filesystem they already share, in
``<root>/.envctl/jobs`` — 0700 like everything below it, the daemons' alone: a user sees a job
or its log only through a daemon's answer, under that daemon's access rules.

- ``<id>/``, one directory per *daemon*, keyed by its stable identity (``daemon_identity``: a
  random id kept in its state directory), not by the host name: a pod restarted under a new name
  with the same state directory is the same daemon and keeps its directory, so its old jobs are
  not listed a second time as another, gone, host's.
- ``<id>/daemon.json``: that daemon's host name (what messages show), pid and start time.
- ``<id>/alive.lock``: a lock (``envctl_shared.locks``) the daemon holds while it runs; NFSv4/EFS
  release it (after the lease) when the host dies. Readers ask whether it is held: a daemon that
  is gone is *marked* (``host_alive: false``), its records kept. A daemon that finds it held by
  another at start has a copied state directory (its own lock keeps two daemons off one): it
  takes a new identity rather than share the directory (``ClusterJobs.start``).
- ``<id>/<job>.json``: the job as ``Job.to_dict`` gives it, written atomically by its daemon on
  every change of state or phase. Only a regular file owned by the daemon's uid and writable by
  nobody else is believed (the same rule as the env records).
- ``<id>/<job>.log``: the build log, copied from the state directory as it grows (at every
  change of the job and every ``poll`` seconds while it runs), so ``request logs`` (``-f``
  too) works on any node, a poll interval behind the build at most.
- ``<id>/cancel/<job>``: a cancel relayed by another daemon (its requester's words in it); the
  owning daemon takes it within one ``poll`` interval and cancels the job as if asked itself.
  The relaying daemon has checked the requester may cancel it (the same rule as locally).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import EnvctlError
from ..heal.fsops import DIR_FLAGS
from ..locks import LockFile, is_locked
from . import layout
from .model import Job, State

log = logging.getLogger(__name__)

JOBS_DIR = "jobs"
AREA_MODE = 0o700  # .envctl/jobs and below: the daemons' alone
ALIVE = "alive.lock"
DAEMON_FILE = "daemon.json"
CANCEL_DIR = "cancel"
ID_FILE = "daemon-id"  # in the state directory: this daemon's identity
MAX_RECORD = 256 << 10  # a job record: its fields, no spec, no log
_COPY_CHUNK = 1 << 20  # bytes of a log copied per read
_ID = re.compile(r"[0-9a-f]{16}")
_JOB = re.compile(r"[0-9a-f]{1,64}")


def host_name() -> str:
    """This daemon's host as people see it (the pod's name under Kubernetes)."""
    return socket.gethostname()


def daemon_identity(state_dir: Path) -> str:
    """This daemon's stable identity: a random id made once and kept in its state directory
    (0600), so it survives restarts and new host names; a new state directory is a new
    daemon."""
    path = state_dir / ID_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
    except FileExistsError:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            found = os.read(fd, 64).decode("ascii", "replace").strip()
        finally:
            os.close(fd)
        if st.st_uid == os.geteuid() and not st.st_mode & 0o077 and _ID.fullmatch(found):
            return found
        os.unlink(path)  # not the daemon's own: make a new one
        return daemon_identity(state_dir)
    try:
        ident = secrets.token_hex(8)
        os.write(fd, f"{ident}\n".encode())
    finally:
        os.close(fd)
    return ident


@dataclass(frozen=True)
class Located:
    """Another daemon's job and that daemon's directory name (its identity)."""

    job: Job
    daemon: str


class ClusterJobs:
    """This daemon's side in the root (records, logs, cancels for it) and the others' read."""

    def __init__(self, root: Path, state_dir: Path, host: str | None = None) -> None:
        self.root = root
        self.host = host or host_name()
        self._state_dir = state_dir
        self.daemon_id = daemon_identity(state_dir)
        self._alive: LockFile | None = None
        self._published: dict[str, int] = {}  # job id -> bytes of its log published

    # -- our side ------------------------------------------------------------------------------

    def start(self) -> None:
        """Create our directory, take our liveness lock and say who we are. A liveness lock
        another daemon holds means a second daemon with this identity (a state directory
        copied from another node's, by a clone or on purpose: the state directory's own lock
        keeps two daemons off one): sharing a directory, each would skip the other's jobs as
        its own, prune its logs and take its cancels — so this one takes a new identity."""
        while not self._start_as(self.daemon_id):
            fresh = self._new_identity()
            log.warning("jobs-cluster identity-taken daemon_id=%s new_daemon_id=%s: another "
                        "daemon has this identity (a copied state directory)", self.daemon_id,
                        fresh)
            self.daemon_id = fresh
        log.info("jobs-cluster start daemon_id=%s host=%s", self.daemon_id, self.host)

    def _start_as(self, ident: str) -> bool:
        """Our directory under ``ident`` with its liveness lock taken (or held by another
        manager of this process); False when another daemon holds it."""
        with self._area() as jobs:
            mine = layout.checked_dir(jobs, ident, AREA_MODE,
                                      f"{self.root}/.envctl/jobs/{ident}")
            try:
                os.close(layout.checked_dir(mine, CANCEL_DIR, AREA_MODE, "cancel"))
                alive = LockFile(mine, ALIVE, f"{self.root}/.envctl/jobs/{ident}/{ALIVE}")
                other = alive.acquire("alive")
                if other is not None and not other.here:
                    return False
                self._alive = alive
                _write_atomic(mine, DAEMON_FILE, json.dumps(
                    {"daemon_id": ident, "host": self.host, "pid": os.getpid(),
                     "since": time.time()}).encode())
            finally:
                os.close(mine)
        return True

    def _new_identity(self) -> str:
        os.unlink(self._state_dir / ID_FILE)
        return daemon_identity(self._state_dir)

    def stop(self) -> None:
        if self._alive is not None:
            self._alive.release()  # this daemon is no longer alive
            self._alive = None

    def publish(self, job: Job) -> None:
        """Write ``job``'s record and the new part of its log; a failure is logged, never
        raised (the job itself does not depend on being visible elsewhere)."""
        data = json.dumps({**job.to_dict(), "host": self.host,
                           "daemon_id": self.daemon_id}).encode()
        try:
            with self._mine() as mine:
                self._sync_log(mine, job)
                _write_atomic(mine, f"{job.id}.json", data)
        except Exception as exc:  # noqa: BLE001 - logged; a build must not fail for this
            log.warning("jobs-cluster publish job=%s error=%s", job.id, exc)

    def sync_logs(self, jobs: list[Job]) -> None:
        """Publish what the running ``jobs``' logs gained since the last time."""
        try:
            with self._mine() as mine:
                for job in jobs:
                    self._sync_log(mine, job)
        except Exception as exc:  # noqa: BLE001 - logged; tried again next time
            log.warning("jobs-cluster log-sync error=%s", exc)

    def _sync_log(self, mine: int, job: Job) -> None:
        try:
            src = os.open(job.log_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        try:
            dst = os.open(f"{job.id}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND
                          | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=mine)
            try:
                done = self._published.get(job.id)
                if done is None:  # after a restart: what an earlier run published
                    done = os.fstat(dst).st_size
                while chunk := os.pread(src, _COPY_CHUNK, done):
                    done += os.write(dst, chunk)
            finally:
                os.close(dst)
        finally:
            os.close(src)
        if job.terminal:
            self._published.pop(job.id, None)
        else:
            self._published[job.id] = done

    def cancels(self) -> list[tuple[str, str]]:
        """Cancels other daemons relayed to us: (job id, who asked), each taken once."""
        found = []
        try:
            with self._mine() as mine:
                cdir = layout.checked_dir(mine, CANCEL_DIR, AREA_MODE, "cancel")
                try:
                    for name in os.listdir(cdir):
                        if name.startswith("."):  # a request being written
                            continue
                        raw = _read_own(cdir, name, 4096)
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(name, dir_fd=cdir)
                        if raw is not None and _JOB.fullmatch(name):
                            found.append((name, raw.decode("utf-8", "replace").strip()
                                          [:500] or "another daemon"))
                finally:
                    os.close(cdir)
        except (OSError, EnvctlError) as exc:
            log.warning("jobs-cluster cancels error=%s", exc)
        return found

    def prune_logs(self, keep: Callable[[str], bool]) -> int:
        """Remove our published logs of jobs for which ``keep(job id)`` is false (their log
        in the state directory is gone); returns how many."""
        removed = 0
        with self._mine() as mine:
            for name in os.listdir(mine):
                job_id = name.removesuffix(".log")
                if name.endswith(".log") and not keep(job_id):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(name, dir_fd=mine)
                        removed += 1
        return removed

    # -- the other daemons ---------------------------------------------------------------------

    def others(self, skip: Callable[[str], bool] = lambda job_id: False) -> list[Job]:
        """Every other daemon's jobs as their records say, each with its daemon's host and
        whether that daemon is alive; a job ``skip`` names (ours: in our store) is left out,
        and a job in two directories (an older daemon's keyed by host name) is listed once."""
        return [found.job for found in self._located(skip)]

    def find(self, job_id: str) -> Located | None:
        """Another daemon's job by its id or a unique prefix of it (ids are random: unique
        across daemons). None when no other daemon has it, or the prefix is ambiguous."""
        hits = [f for f in self._located(lambda j: False)
                if f.job.id == job_id or f.job.id.startswith(job_id.lower())]
        exact = [f for f in hits if f.job.id == job_id]
        return exact[0] if exact else hits[0] if len(hits) == 1 else None

    def _located(self, skip: Callable[[str], bool]) -> list[Located]:
        found: dict[str, Located] = {}
        try:
            with self._area(create=False) as jobs:
                for entry in sorted(os.listdir(jobs)):
                    if entry == self.daemon_id or entry.startswith("."):
                        continue
                    for job in self._daemon_jobs(jobs, entry):
                        if not skip(job.id) and (job.id not in found or job.host_alive):
                            found[job.id] = Located(job, entry)
        except (OSError, EnvctlError):  # no area yet, or one the daemon cannot trust
            pass
        return list(found.values())

    def _daemon_jobs(self, jobs: int, entry: str) -> Iterator[Job]:
        try:
            ddir = os.open(entry, DIR_FLAGS, dir_fd=jobs)
        except OSError:
            return
        try:
            if os.fstat(ddir).st_uid != os.geteuid():
                return  # not a daemon's directory
            alive = _held(ddir, ALIVE)
            raw = _read_own(ddir, DAEMON_FILE, 4096)
            try:
                host = str(json.loads(raw or b"{}").get("host") or "") or None
            except (ValueError, AttributeError):
                host = None
            for name in os.listdir(ddir):
                if name.endswith(".json") and name != DAEMON_FILE and not name.startswith("."):
                    job = _read(ddir, name, alive, host)
                    if job is not None:
                        yield job
        finally:
            os.close(ddir)

    def read_log(self, where: Located, offset: int, limit: int) -> tuple[bytes, int]:
        """Up to ``limit`` bytes of another daemon's published log of a job from ``offset``."""
        with self._area(create=False) as jobs:
            ddir = os.open(where.daemon, DIR_FLAGS, dir_fd=jobs)
            try:
                fd = os.open(f"{where.job.id}.log", os.O_RDONLY | os.O_NOFOLLOW
                             | os.O_CLOEXEC, dir_fd=ddir)
            except FileNotFoundError:
                return b"", offset
            finally:
                os.close(ddir)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                return b"", offset
            chunk = os.pread(fd, limit, offset)
        finally:
            os.close(fd)
        return chunk, offset + len(chunk)

    def log_size(self, where: Located) -> int:
        with self._area(create=False) as jobs:
            try:
                return os.stat(f"{where.daemon}/{where.job.id}.log", dir_fd=jobs,
                               follow_symlinks=False).st_size
            except OSError:
                return 0

    def ask_cancel(self, where: Located, who: str) -> None:
        """Relay a cancel of ``where.job`` to its daemon (see the module docstring)."""
        with self._area(create=False) as jobs:
            ddir = os.open(where.daemon, DIR_FLAGS, dir_fd=jobs)
            try:
                cdir = layout.checked_dir(ddir, CANCEL_DIR, AREA_MODE, "cancel", create=False)
            finally:
                os.close(ddir)
            try:
                _write_atomic(cdir, where.job.id, f"{who}\n".encode())
            finally:
                os.close(cdir)
        log.info("jobs-cluster cancel-relayed job=%s daemon_id=%s", where.job.id,
                 where.daemon)

    # -- directories ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def _area(self, create: bool = True) -> Iterator[int]:
        """The fd of ``<root>/.envctl/jobs`` (created, owner and mode checked, never a
        symlink)."""
        with layout.RootArea(self.root).open() as fds:
            jobs = layout.checked_dir(fds.area, JOBS_DIR, AREA_MODE,
                                      f"{self.root}/.envctl/{JOBS_DIR}", create)
            try:
                yield jobs
            finally:
                os.close(jobs)

    @contextlib.contextmanager
    def _mine(self) -> Iterator[int]:
        with self._area() as jobs:
            mine = os.open(self.daemon_id, DIR_FLAGS, dir_fd=jobs)
            try:
                yield mine
            finally:
                os.close(mine)


def _write_atomic(dir_fd: int, name: str, data: bytes) -> None:
    tmp = f".tmp-{name}-{threading.get_ident()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600, dir_fd=dir_fd)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask or an older file: the daemons' alone
        os.write(fd, data)
    finally:
        os.close(fd)
    os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)


def _held(parent: int, name: str) -> bool | None:
    """Whether someone holds the lock on ``name`` (None: cannot tell)."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
    except FileNotFoundError:
        return False  # no lock file: no daemon with that identity runs
    except OSError:
        return None
    try:
        return is_locked(fd)
    except OSError:
        return None
    finally:
        os.close(fd)


def _read_own(dir_fd: int, name: str, limit: int) -> bytes | None:
    """A regular file the daemon's uid wrote and nobody else can write, if at most ``limit``
    bytes; else None."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     dir_fd=dir_fd)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if (not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022
                or st.st_size > limit):
            return None
        raw = b""
        while chunk := os.read(fd, limit + 1 - len(raw)):  # NFS may return less
            raw += chunk
        return raw
    finally:
        os.close(fd)


def _read(ddir: int, name: str, alive: bool | None, host: str | None) -> Job | None:
    """A record, if the daemon wrote it (owner, mode) and it parses; else None."""
    raw = _read_own(ddir, name, MAX_RECORD)
    if raw is None:
        return None
    try:
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
                   host=host or str(d["host"]), host_alive=alive)
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return None
