"""The jobs layer's public API and scheduler: what the socket API calls.

Why a manager between the API and the builds: it is the one place that knows every job at once,
so it enforces the limits (``requests.max_concurrent``, one queued/running job per name,
``requests.max_queued_per_user`` per requester), turns a daemon restart into a non-event
(``start`` resumes queued jobs and turns running ones into ``interrupted`` after killing what
the dead daemon left and removing its partial output), and wakes waiters (``wait``) on every
state, phase or log change so ``logs -f`` needs no polling of its own. Threads: one scheduler, one
thread per running build (plus its log reader). Every public method is safe to call from any thread.

Validation order in ``submit`` is what makes "nothing is created on bad input" true: name,
backend, spec, backend-specific checks and the build user are all checked before the job row
and its directory exist.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

from ..config import Config
from ..errors import (
    ConfigError,
    Conflict,
    DaemonUnavailable,
    EnvctlError,
    LimitReached,
    NotAuthorised,
    NotFound,
    ValidationError,
)
from ..logfields import fields
from . import cgroup as cgroups
from . import envs, layout, procs
from .backends import get_backend
from .cluster import ClusterJobs
from .env_service import Allow, EnvService
from .lock import NameLock
from .model import Job, Requester, State
from .runner import Build, discard
from .spec import parse_spec, validate_name, validate_tests
from .store import JobStore

log = logging.getLogger(__name__)

MAX_LOG_CHUNK = 1 << 20
REPUBLISH_S = 86400.0  # jobs that ended this recently are published again at start


class JobManager:
    """Owns the store, the scheduler and the running builds of one daemon."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self._state = layout.StateDir(config.requests.state_dir)
        self._store: JobStore | None = None
        self._cond = threading.Condition()
        self._version = 0  # bumped on every change; waiters compare it
        self._running: dict[str, Build] = {}
        self._threads: dict[str, threading.Thread] = {}
        self._submit_lock = threading.Lock()
        self._stopping = False
        self._scheduler: threading.Thread | None = None
        self._cgroups: cgroups.CgroupTree | None = None
        self._cluster: ClusterJobs | None = None  # our jobs in the root, other hosts' read back
        self.containment = "none"  # how builds are contained: "cgroup" or "sweep" once started
        self.sandbox = "none"  # "mount-namespace" once started where the kernel allows it
        self._busy_uids: set[int] = set()  # the pool's accounts running a build now
        self.environments = EnvService(config)  # the env-* ops; started and stopped with us

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def store(self) -> JobStore:
        if self._store is None:
            raise DaemonUnavailable("the daemon's job manager is not running",
                                    hint="the daemon is starting or stopping; retry shortly")
        return self._store

    def start(self) -> None:
        """Lock the state dir (another daemon's: Conflict, see ``StateDir.ensure``), open the
        store, recover from a previous daemon, start scheduling."""
        procs.adopt_orphans()  # before any build: their escaped children must come to us
        self._state.ensure()
        self._cgroups, how = cgroups.setup(self._state.path)
        self.containment = "cgroup" if self._cgroups is not None else "sweep"
        log.info("jobs-containment mechanism=%s %s", self.containment, how)
        self._store = JobStore(self._state.db_path)
        self._start_cluster()
        why = procs.namespaces()
        self.sandbox = "mount-namespace" if why is None else "none"
        log.info("jobs-sandbox mechanism=%s%s", self.sandbox, f" reason={why!r}" if why else "")
        for user in self._pool():  # one who cannot reach the root: refuse to start
            procs.check_reach(user, self._config.requests_root.path)
        self.environments.start()
        self._recover()
        self._prune_logs()
        self._scheduler = threading.Thread(target=self._schedule, name="envctl-jobs",
                                           daemon=True)
        self._scheduler.start()
        log.info("jobs-start state_dir=%s %s", self._state.path,
                 " ".join(f"{k}={v}" for k, v in self.counts().items()))

    def _start_cluster(self) -> None:
        """Publish our jobs where the other hosts sharing the root read them (``cluster``);
        a root that cannot hold them leaves this daemon's view local, as before."""
        cluster = ClusterJobs(self._config.requests_root.path)
        try:
            cluster.start()
        except (OSError, EnvctlError) as exc:
            log.warning("jobs-cluster unusable root=%s error=%s",
                        self._config.requests_root.path, exc)
            return
        self._cluster = cluster
        store = self.store
        store.on_change = lambda job_id: cluster.publish(store.get(job_id))
        # Every change is published as it happens; a daemon that died between its store and
        # its record left a recent job stale (recovery just changed some too). Older records
        # are current, and rewriting thousands would cost a start round trips on NFS.
        recent = time.time() - REPUBLISH_S
        for job in store.list(include_finished=True):
            if not job.terminal or (job.finished_at or 0) >= recent:
                cluster.publish(job)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop scheduling; kill running builds (they become ``interrupted``)."""
        self.environments.stop()
        with self._cond:
            self._stopping = True
            for build in self._running.values():
                build.abort(State.INTERRUPTED, "the daemon stopped during the build")
            threads = list(self._threads.values())
            self._cond.notify_all()
        deadline = time.monotonic() + timeout
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        if self._scheduler is not None:
            self._scheduler.join(max(0.0, deadline - time.monotonic()))
        if all(not t.is_alive() for t in threads) and self._store is not None:
            self._store.close()
            self._store = None
            self._state.release()  # another daemon may have it now (not while builds run)
        if self._cluster is not None:
            self._cluster.stop()
            self._cluster = None
        log.info("jobs-stop interrupted=%d", len(threads))

    def reload(self, config: Config) -> None:
        """New limits and policy for jobs started from now on (running ones keep theirs)."""
        if config.requests.state_dir != self._config.requests.state_dir:
            log.warning("jobs-reload state_dir change needs a restart old=%s new=%s",
                        self._config.requests.state_dir, config.requests.state_dir)
            config = _with_state_dir(config, self._config.requests.state_dir)
        self.environments.reload(config)
        with self._cond:
            self._config = config
            self._cond.notify_all()

    def _recover(self) -> None:
        """What a dead daemon left: kill everything its builds still run, discard their output,
        mark their jobs interrupted.

        Three nets, widest last: each running job's recorded cgroup (nothing escapes it), its
        recorded process group, and — for builds that had no cgroup (no writable cgroup v2 here,
        or an older daemon) and left their group — every build-user process no daemon holds
        any more (``procs.sweep_orphans``). Each job's log says which net caught how many.
        """
        jobs = self.store.list(states=(State.RUNNING,))
        notes: dict[str, list[str]] = {}
        for job in jobs:
            uid, pgid, started, cgroup = self.store.process(job.id)
            in_cgroup = 0
            if cgroup:  # maybe below another base: the dead daemon ran in another cgroup
                in_cgroup = cgroups.CgroupTree(Path(cgroup).parent).discard(Path(cgroup))
            in_group = procs.kill_orphans(pgid, started, uid) if pgid and started and uid else 0
            notes[job.id] = [f"the daemon stopped during the build; killed {in_cgroup} "
                             f"process(es) in the build's cgroup and {in_group} orphaned "
                             "process(es) of its process group"]
            log.info("jobs-recover id=%s name=%s cgroup_killed=%d group_killed=%d", job.id,
                     job.name, in_cgroup, in_group)
        unrecorded = self._cgroups.clear() if self._cgroups is not None else 0
        swept = self._sweep_orphans()
        if unrecorded or swept:
            log.warning("jobs-recover-leftovers cgroup_killed=%d swept=%d", unrecorded, swept)
        for job in jobs:
            lines = notes[job.id]
            if swept:
                lines.append(f"killed {swept} orphaned build-user process(es) that had left "
                             "every group (start-up sweep)")
            try:
                self._discard_dead(job, lines.append)
            except Exception as exc:
                lines.append(f"could not remove the partial output: {exc}")
                log.exception("jobs-recover-discard id=%s", job.id)
            self.store.update(job.id, state=State.INTERRUPTED, phase=None,
                              finished_at=time.time(), pgid=None, pgid_start=None, cgroup=None,
                              exit_detail="interrupted: the daemon stopped during the build; "
                                          "partial output removed")
            self._append_log(job.id, lines)

    def _pool(self) -> tuple[procs.BuildUser, ...]:
        """The build accounts (none configured: every request says so)."""
        try:
            return procs.build_users(self._config.requests)
        except ConfigError:
            return ()

    def max_builds(self) -> int:
        """How many builds run at once: one per build account, at most max_concurrent."""
        return min(self._config.requests.max_concurrent, len(self._pool()))

    def _sweep_orphans(self) -> int:
        return sum(procs.sweep_orphans(user) for user in self._pool())

    def _discard_dead(self, job: Job, say: Callable[[str], None]) -> None:
        area = layout.RootArea(self._config.requests_root.path)
        with area.open() as fds:
            lock = NameLock(fds["locks"], str(area.root), job.name, job.id)
            try:
                lock.acquire()
            except Conflict:  # another host builds this name now: its next build or GC
                say("another daemon holds the name: the unfinished version is removed by "
                    "the next build of the name or by GC")
                return
            try:
                discard(job, fds, say)
            finally:
                lock.release()

    def _prune_logs(self) -> None:
        """Remove job directories (spec copy, log) of jobs finished over keep_logs_days ago;
        the job rows stay, so history and audit survive."""
        cutoff = time.time() - self._config.requests.keep_logs_days * 86400
        pruned = 0
        for job in self.store.list(include_finished=True):
            if job.terminal and (job.finished_at or 0) < cutoff:
                pruned += self._state.remove_job_dir(job.id)
        if pruned:
            log.info("jobs-prune removed=%d days=%d", pruned,
                     self._config.requests.keep_logs_days)

    def _append_log(self, job_id: str, lines: list[str]) -> None:
        try:
            fd = self._state.open_log(job_id)
        except OSError:
            return
        with os.fdopen(fd, "a", encoding="utf-8") as fh:
            for line in lines:
                fh.write(f"[envctl {time.strftime('%H:%M:%S')}] {line}\n")

    # -- scheduling -----------------------------------------------------------------------------

    def _notify(self) -> None:
        with self._cond:
            self._version += 1
            self._cond.notify_all()

    def _schedule(self) -> None:
        while True:
            with self._cond:
                if self._stopping:
                    return
                pool = self._pool()
                users = [u for u in pool if u.uid not in self._busy_uids]
                free = min(self._config.requests.max_concurrent - len(self._running),
                           len(users) if pool else 1)  # no account: each job says so
                queued = self.store.list(states=(State.QUEUED,)) if free > 0 else []
                slots: list[procs.BuildUser | None] = [*users] if pool else [None] * free
                for job, user in zip(queued[:free], slots):
                    self._launch(job, user)
                self._cond.wait(1.0)

    def _launch(self, job: Job, user: procs.BuildUser | None) -> None:
        """Start one queued job as ``user``, a free account of the pool (called with
        ``_cond`` held)."""
        now = time.time()
        if not self.store.update(job.id, expect=(State.QUEUED,), state=State.RUNNING,
                                 started_at=now, phase="preparing"):
            return  # cancelled meanwhile
        job = self.store.get(job.id)
        try:
            build = Build(job, self._config, self.store, self._state, self._notify,
                          self._cgroups, user or procs.build_user(self._config.requests))
        except Exception as exc:  # noqa: BLE001 - e.g. backend no longer allowed after reload
            self.store.update(job.id, state=State.FAILED, phase=None, finished_at=now,
                              exit_detail=str(exc))
            self._version += 1
            return
        thread = threading.Thread(target=self._execute, args=(build,), daemon=True,
                                  name=f"envctl-job-{job.id}")
        self._running[job.id] = build
        self._busy_uids.add(build.user.uid)
        self._threads[job.id] = thread
        self._version += 1
        self._cond.notify_all()
        log.info("job-start id=%s name=%s backend=%s", job.id, job.name, job.backend,
                 extra=fields(job=job.id))
        thread.start()

    def _execute(self, build: Build) -> None:
        outcome = build.run()
        job = build.job
        with self._cond:
            self.store.update(job.id, expect=(State.RUNNING,), state=outcome.state, phase=None,
                              finished_at=time.time(), exit_detail=outcome.detail)
            del self._running[job.id]
            self._busy_uids.discard(build.user.uid)
            del self._threads[job.id]
            self._version += 1
            self._cond.notify_all()
        log.info("job-end id=%s name=%s state=%s seconds=%.1f", job.id, job.name,
                 outcome.state.value, time.time() - (job.started_at or time.time()),
                 extra=fields(job=job.id))

    # -- the API --------------------------------------------------------------------------------

    def submit(self, requester: Requester, name: str, spec_text: str,
               backend: str | None = None, replace: bool = False,
               tests: Sequence[str] = (), base: str | None = None) -> Job:
        """Validate, persist and queue a build; ValidationError/Conflict before anything exists.
        ``tests`` are command lines the new version must pass before it is made current;
        ``base``: the version the spec was derived from, which must still be current."""
        config = self._config
        cfg = config.requests
        if not cfg.enabled:
            raise NotAuthorised("environment requests are disabled on this daemon",
                                hint="ask the administrator (requests.enabled)")
        name = validate_name(name)
        chosen = get_backend(backend or cfg.backend, cfg)
        spec = parse_spec(spec_text, cfg)
        chosen.check(spec, cfg)
        tests = validate_tests(list(tests))
        procs.check_reach(procs.build_user(cfg), config.requests_root.path)
        prefix = config.requests_root.path / name
        with self._submit_lock:
            active = self.store.list()
            _refuse_busy(name, active)  # first: --replace cannot help
            mine = sum(1 for j in active if requester.owns(j))
            if not requester.is_admin and mine >= cfg.max_queued_per_user:
                raise LimitReached(
                    f"{requester.who} already has {mine} jobs queued or running, the most one "
                    f"requester may (requests.max_queued_per_user = {cfg.max_queued_per_user})",
                    hint="wait for one to finish, or cancel one ('envctl request list')")
            cur = self.environments.current(name)
            kind = cur.kind
            if base is not None and cur.version != base:
                raise Conflict(f"{name!r} changed while the request was prepared (now "
                               f"{cur.version or 'no version'}, was {base})",
                               hint="run the command again")
            if kind != "missing" and not replace:
                raise Conflict(f"{prefix} already exists",
                               hint="pick another name, or replace it with --replace (its "
                                    "owner or an admin)")
            if kind == "unmanaged":
                raise Conflict(f"{prefix} is not an environment envctl manages (made by hand):"
                               " the daemon never replaces or moves it",
                               hint="pick another name, or move it away yourself")
            job_id = secrets.token_hex(6)
            job = Job(id=job_id, name=name, state=State.QUEUED, phase=None, backend=chosen.name,
                      requester_uid=requester.uid, requester_gid=requester.gid,
                      requester_groups=tuple(requester.groups),
                      requester_name=requester.username, claimed_user=requester.claimed_user,
                      replace=replace, created_at=time.time(), started_at=None,
                      finished_at=None, prefix=str(prefix), exit_detail=None,
                      log_path=str(self._state.log_path(job_id)), hub_user=requester.hub_user,
                      hub_id=requester.hub_id)
            self._state.create_job_dir(job_id)  # before the row: the scheduler may start it
            if tests:
                self._state.write_tests(job_id, list(tests))
            try:
                self.store.insert(job, spec_text, requester.pid)
            except Conflict:
                self._state.remove_job_dir(job_id)
                raise
        log.info("job-submit id=%s name=%s backend=%s uid=%d hub_user=%s claimed=%s replace=%s",
                 job_id, name, job.backend, requester.uid, requester.hub_user,
                 requester.claimed_user, replace,
                 extra=fields(job=job_id))
        self._notify()
        return job

    def submit_change(self, requester: Requester, name: str,
                      change: Callable[[str], str] | None, tests: Sequence[str],
                      allow: Allow) -> Job:
        """``env add``/``env update``: a replace built from the current version's spec as its
        record keeps it (``change`` edits the text; None re-solves it as it is), its backend,
        and its tests followed by ``tests``. The record is read under the name's lock (no build
        of the name is running) and ``submit`` queues the job only if that version is still
        current, so a replace or rollback that came in between is never undone. ``allow``: the
        API's owner check, called with the recorded owner under the lock. A queued
        build of the name is refused first: taking its lock now would fail that build."""
        _refuse_busy(name, self.store.list())
        with self.environments.locked(name, "change") as (fds, env_fd):
            allow(self.environments.owner_of(env_fd))
            cur = envs.current(fds[""], name)
            rec = envs.ready(env_fd, cur.version) if cur.version is not None else None
        if rec is None or not isinstance(rec.get("spec"), str):
            raise Conflict(f"{name!r} has no current version built from a spec to start from",
                           hint=f"see: envctl env show {name}; or request it anew with "
                                "'envctl request create --replace'")
        spec = rec["spec"] if change is None else change(rec["spec"])
        kept = [t for t in rec.get("tests") or [] if isinstance(t, str)]
        return self.submit(requester, name, spec, backend=rec.get("backend"), replace=True,
                           tests=list(dict.fromkeys([*kept, *tests])), base=cur.version)

    def get(self, job_id: str) -> Job:
        """Our job, or another host's as its record in the root says (``host`` set)."""
        try:
            return self.store.get(job_id)
        except NotFound:
            remote = self._cluster.find(job_id) if self._cluster is not None else None
            if remote is None:
                raise
            return remote

    def list(self, uid: int | None = None, include_finished: bool = False,
             hub_user: str | None = None) -> list[Job]:
        """Our jobs, then the other hosts' sharing the root (their records), filtered alike."""
        jobs = self.store.list(uid=uid, include_finished=include_finished, hub_user=hub_user)
        if self._cluster is not None:
            jobs += [j for j in self._cluster.others()
                     if (include_finished or not j.terminal)
                     and (uid is None or (j.requester_uid, j.hub_user) == (uid, hub_user))]
        return jobs

    def _local(self, job: Job, what: str) -> None:
        """Refuse what only the job's own daemon can do (its log, cancelling it)."""
        if job.host is not None:
            up = {True: "its daemon is up", False: "its daemon is gone: the host left or "
                  "stopped", None: "its daemon's state is unknown"}[job.host_alive]
            raise Conflict(f"job {job.id} is on host {job.host} ({up}): {what} there",
                           hint=f"run the command on {job.host}, or with the socket of its "
                                "daemon")

    def cancel(self, job_id: str, requester: Requester) -> Job:
        """Cancel a queued or running job (who may is the API's decision: ``auth``)."""
        job = self.get(job_id)
        self._local(job, "cancel it")
        detail = f"cancelled by {requester.who}"
        with self._cond:
            if self.store.update(job_id, expect=(State.QUEUED,), state=State.CANCELLED,
                                 finished_at=time.time(), exit_detail=detail):
                self._version += 1
                self._cond.notify_all()
                log.info("job-cancel id=%s by=%d queued", job_id, requester.uid,
                         extra=fields(job=job_id))
                return self.store.get(job_id)
            build = self._running.get(job_id)
            if build is None:
                job = self.store.get(job_id)
                raise Conflict(f"job {job_id} has already ended ({job.state.value})")
            build.abort(State.CANCELLED, detail)
            thread = self._threads[job_id]
        log.info("job-cancel id=%s by=%d running", job_id, requester.uid,
                 extra=fields(job=job_id))
        thread.join(procs.KILL_GRACE + 10.0)
        return self.store.get(job_id)

    def read_log(self, job_id: str, offset: int = 0, limit: int = 65536) -> tuple[bytes, int]:
        """Up to ``limit`` bytes of the build log from ``offset``; returns (chunk, next offset)."""
        if offset < 0 or limit < 0:
            raise ValidationError("log offset and limit must not be negative")
        job = self.get(job_id)
        self._local(job, "its build log is kept")
        try:
            fd = os.open(job.log_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return b"", offset
        try:
            chunk = os.pread(fd, min(limit, MAX_LOG_CHUNK), offset)
        finally:
            os.close(fd)
        return chunk, offset + len(chunk)

    def wait(self, job_id: str, timeout: float) -> Job:
        """Return when the job's state or phase changes, its log grows, or after ``timeout``."""
        job = self.get(job_id)
        if job.terminal or job.host is not None:
            return job
        size = _size(job.log_path)
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            with self._cond:
                seen = self._version
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return self.store.get(job_id)
                while self._version == seen and remaining > 0:
                    self._cond.wait(remaining)
                    remaining = deadline - time.monotonic()
            now = self.store.get(job_id)
            if (now.state, now.phase) != (job.state, job.phase) or _size(job.log_path) != size:
                return now

    def counts(self) -> dict[str, int]:
        return self.store.counts()


def _refuse_busy(name: str, active: Sequence[Job]) -> None:
    """One queued or running build per name."""
    if any(j.name == name for j in active):
        raise Conflict(f"a build of {name!r} is already queued or running",
                       hint="wait for it to finish ('envctl request list --all'), or cancel it")


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def _with_state_dir(config: Config, state_dir: Path) -> Config:
    return replace(config, requests=replace(config.requests, state_dir=state_dir))
