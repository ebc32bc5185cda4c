"""The jobs layer's public API and scheduler: what the socket API calls.

Why a manager between the API and the builds: it is the one place that knows every job at once,
so it enforces the limits (``requests.max_concurrent``, one queued/running job per name,
``requests.max_queued_per_user`` per requester), turns a daemon restart into a non-event
(``start`` resumes queued jobs and turns running ones into ``interrupted`` after killing what
the dead daemon left and removing its partial output), and wakes waiters (``wait``) on every
state, phase or log change so ``logs -f`` needs no polling of its own. Free build slots go round
robin across requesters (``fair_order``), not first come first served: one requester's queue
of slow builds must not hold every slot while another's waits. Threads: one scheduler, one
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
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

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
from ..logfields import Subject
from . import cgroup as cgroups
from . import envs, layout, procs
from .backends import get_backend
from .cluster import ClusterJobs, Located
from .env_service import Allow, EnvService
from .lock import NameLock
from .model import Job, Requester, State
from .runner import Build, discard, tree_bytes
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
        self._cluster_stop = threading.Event()
        self.containment = "none"  # how builds are contained: "cgroup" or "sweep" once started
        self.sandbox = "none"  # "mount-namespace" once started where the kernel allows it
        self._busy_uids: set[int] = set()  # the pool's accounts running a build now
        self._last_start: dict[tuple[int, str | None], float] = {}  # requester -> monotonic
        self._prune_lock = threading.Lock()
        self._dir_bytes: dict[str, int] = {}  # finished jobs' directory sizes (they are done)
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
        try:
            cluster = ClusterJobs(self._config.requests_root.path, self._state.path)
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
        self._cluster_stop.clear()
        threading.Thread(target=self._cluster_loop, args=(cluster,), name="envctl-cluster",
                         daemon=True).start()

    def _cluster_loop(self, cluster: ClusterJobs) -> None:
        """Every ``watch.poll_interval``: publish what running builds' logs gained, and take
        the cancels other daemons relayed for our jobs; hourly, drop published logs whose
        local log was pruned."""
        pruned = 0.0
        while not self._cluster_stop.wait(self._config.watch.poll_interval):
            try:
                cluster.sync_logs(self.store.list(states=(State.RUNNING,)))
                for job_id, who in cluster.cancels():
                    threading.Thread(target=self._relayed_cancel, args=(job_id, who),
                                     name=f"envctl-cancel-{job_id}", daemon=True).start()
                if time.monotonic() - pruned > 3600:
                    pruned = time.monotonic()
                    cluster.prune_logs(lambda job_id: self._state.log_path(job_id).exists())
            except Exception:  # noqa: BLE001 - e.g. the store closing at stop: try again
                log.exception("jobs-cluster-loop")

    def _relayed_cancel(self, job_id: str, who: str) -> None:
        try:
            self._cancel_here(self.store.get(job_id), who)
        except EnvctlError as exc:
            log.info("jobs-cluster cancel-refused job=%s reason=%s", job_id, exc.message)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop scheduling; kill running builds (they become ``interrupted``)."""
        self.environments.stop()
        self._cluster_stop.set()
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
            lock = NameLock(fds.locks, str(area.root), job.name, job.id)
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
        """Remove job directories (spec copy, log, HOME) of jobs finished over keep_logs_days
        ago, then the oldest finished jobs' until all together hold at most
        ``requests.max_log_bytes``; the job rows stay, so history and audit survive. At start
        and after every build."""
        cfg = self._config.requests
        cutoff = time.time() - cfg.keep_logs_days * 86400
        with self._prune_lock:
            jobs = self.store.list(include_finished=True)
            sizes = {j.id: self._job_dir_bytes(j) for j in jobs}
            total = sum(sizes.values())
            pruned = 0
            for job in sorted((j for j in jobs if j.terminal), key=lambda j: j.finished_at or 0):
                if sizes[job.id] and ((job.finished_at or 0) < cutoff
                                      or total > cfg.max_log_bytes):
                    pruned += self._state.remove_job_dir(job.id)
                    total -= sizes[job.id]
                    self._dir_bytes[job.id] = 0
        if pruned:
            log.info("jobs-prune removed=%d days=%d kept_bytes=%d max_log_bytes=%d", pruned,
                     cfg.keep_logs_days, total, cfg.max_log_bytes)

    def _job_dir_bytes(self, job: Job) -> int:
        """What a job's directory holds; a finished one's is measured once."""
        if not job.terminal:
            return tree_bytes(self._state.job_dir(job.id))
        if job.id not in self._dir_bytes:
            self._dir_bytes[job.id] = tree_bytes(self._state.job_dir(job.id))
        return self._dir_bytes[job.id]

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
                chosen = fair_order(queued, (b.job for b in self._running.values()),
                                    self._last_start, free)
                for job, user in zip(chosen, slots):
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
        self._last_start[requester_key(job)] = time.monotonic()
        self._threads[job.id] = thread
        self._version += 1
        self._cond.notify_all()
        Subject(log, job=job.id).info("job-start name=%s backend=%s", job.name, job.backend)
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
        Subject(log, job=job.id).info("job-end name=%s state=%s seconds=%.1f", job.name,
                                      outcome.state.value,
                                      time.time() - (job.started_at or time.time()))
        try:
            self._prune_logs()
        except Exception:  # noqa: BLE001 - retention must not take the scheduler down
            log.exception("jobs-prune-failed")

    # -- the API --------------------------------------------------------------------------------

    def submit(self, requester: Requester, name: str, spec_text: str,
               backend: str | None = None, replace: bool = False,
               tests: Sequence[str] = (), base: str | None = None,
               description: str | None = None, why: str | None = None) -> Job:
        """Validate, persist and queue a build; ValidationError/Conflict before anything exists.
        ``tests`` are command lines the new version must pass before it is made current;
        ``base``: the version the spec was derived from, which must still be current;
        ``description``: the env's description once the version is current (and its ``why``,
        unless ``why`` says otherwise: see ``StateDir.write_note``)."""
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
        if description is not None:
            description = envs.validate_description(description)
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
            if description is not None or why is not None:
                self._state.write_note(job_id, description, why)
            try:
                self.store.insert(job, spec_text, requester.pid)
            except Conflict:
                self._state.remove_job_dir(job_id)
                raise
        Subject(log, job=job_id).info(
            "job-submit name=%s backend=%s uid=%d hub_user=%s claimed=%s replace=%s", name,
            job.backend, requester.uid, requester.hub_user, requester.claimed_user, replace)
        self._notify()
        return job

    def submit_change(self, requester: Requester, name: str,
                      change: Callable[[str], str] | None, tests: Sequence[str],
                      allow: Allow, why: str | None = None) -> Job:
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
            cur = envs.current(fds.root, name)
            rec = envs.ready(env_fd, cur.version) if cur.version is not None else None
        if rec is None or not isinstance(rec.get("spec"), str):
            raise Conflict(f"{name!r} has no current version built from a spec to start from",
                           hint=f"see: envctl env show {name}; or request it anew with "
                                "'envctl request create --replace'")
        spec = rec["spec"] if change is None else change(rec["spec"])
        kept = [t for t in rec.get("tests") or [] if isinstance(t, str)]
        return self.submit(requester, name, spec, backend=rec.get("backend"), replace=True,
                           tests=list(dict.fromkeys([*kept, *tests])), base=cur.version,
                           why=why)

    def get(self, job_id: str) -> Job:
        """Our job, or another daemon's as its record in the root says (``host`` set)."""
        try:
            return self.store.get(job_id)
        except NotFound:
            found = self._cluster.find(job_id) if self._cluster is not None else None
            if found is None:
                raise
            return found.job

    def _elsewhere(self, job_id: str) -> Located:
        """Another daemon's job (``cluster``) by its full id; NotFound when it is gone."""
        found = self._cluster.find(job_id) if self._cluster is not None else None
        if found is None:
            raise NotFound(f"no job {job_id}", hint="see: envctl request list --all")
        return found

    def list(self, uid: int | None = None, include_finished: bool = False,
             hub_user: str | None = None) -> list[Job]:
        """Our jobs, then the other hosts' sharing the root (their records), filtered alike."""
        jobs = self.store.list(uid=uid, include_finished=include_finished, hub_user=hub_user)
        if self._cluster is not None:
            own = {j.id for j in self.store.list(include_finished=True)}
            jobs += [j for j in self._cluster.others(skip=own.__contains__)
                     if (include_finished or not j.terminal)
                     and (uid is None or (j.requester_uid, j.hub_user) == (uid, hub_user))]
        return jobs

    def cancel(self, job_id: str, requester: Requester) -> Job:
        """Cancel a queued or running job (who may is the API's decision: ``auth``); another
        daemon's job through the root (``cluster``), within its poll interval."""
        job = self.get(job_id)
        if job.host is None:
            return self._cancel_here(job, requester.who)
        assert self._cluster is not None
        where = self._elsewhere(job.id)
        if job.terminal:
            raise _ended(job)
        if job.host_alive is False:
            raise Conflict(f"job {job.id} is on host {job.host}, whose daemon is gone: nothing "
                           "runs it now", hint="its daemon marks it interrupted when it starts "
                           "again")
        self._cluster.ask_cancel(where, f"{requester.who} via {self._cluster.host}")
        # its daemon takes it within its poll interval (the same as ours, in one cluster)
        deadline = time.monotonic() + 2 * self._config.watch.poll_interval + \
            procs.KILL_GRACE + 10.0
        while time.monotonic() < deadline:
            time.sleep(0.2)
            now = self._cluster.find(job.id)
            if now is not None and now.job.terminal:
                return now.job
        return self.get(job.id)

    def _cancel_here(self, job: Job, who: str) -> Job:
        """Cancel our own job ``job`` for ``who`` (already allowed to)."""
        job_id = job.id
        detail = f"cancelled by {who}"
        with self._cond:
            if self.store.update(job_id, expect=(State.QUEUED,), state=State.CANCELLED,
                                 finished_at=time.time(), exit_detail=detail):
                self._version += 1
                self._cond.notify_all()
                Subject(log, job=job_id).info("job-cancel by=%r queued", who)
                return self.store.get(job_id)
            build = self._running.get(job_id)
            if build is None:
                raise _ended(self.store.get(job_id))
            build.abort(State.CANCELLED, detail)
            thread = self._threads[job_id]
        Subject(log, job=job_id).info("job-cancel by=%r running", who)
        thread.join(procs.KILL_GRACE + 10.0)
        return self.store.get(job_id)

    def read_log(self, job_id: str, offset: int = 0, limit: int = 65536) -> tuple[bytes, int]:
        """Up to ``limit`` bytes of the build log from ``offset``; returns (chunk, next offset)."""
        if offset < 0 or limit < 0:
            raise ValidationError("log offset and limit must not be negative")
        job = self.get(job_id)
        if job.host is not None:
            assert self._cluster is not None
            return self._cluster.read_log(self._elsewhere(job.id), offset,
                                          min(limit, MAX_LOG_CHUNK))
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
        if job.terminal:
            return job
        if job.host is not None:
            return self._wait_elsewhere(job, timeout)
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

    def _wait_elsewhere(self, job: Job, timeout: float) -> Job:
        """``wait`` for another daemon's job: its record and published log, read again every
        half second (they change at most once per that daemon's poll interval)."""
        assert self._cluster is not None
        where = self._elsewhere(job.id)
        size = self._cluster.log_size(where)
        deadline = time.monotonic() + max(0.0, timeout)
        while (remaining := deadline - time.monotonic()) > 0:
            time.sleep(min(0.5, remaining))
            now = self._cluster.find(job.id)
            if now is None:
                return job
            if (now.job.state, now.job.phase) != (job.state, job.phase) or \
                    self._cluster.log_size(now) != size:
                return now.job
        return job

    def cluster(self) -> dict[str, str] | None:
        """This daemon's identity among those sharing the root (``status``), or None."""
        cluster = self._cluster
        return None if cluster is None else {"daemon_id": cluster.daemon_id,
                                             "host": cluster.host}

    def counts(self) -> dict[str, int]:
        return self.store.counts()

    def limits(self) -> dict[str, Any]:
        """``status``'s ``limits``: each build's (``requests.limits``) and which cgroup
        controllers enforce them here (``missing``: builds run without those limits)."""
        present = list(self._cgroups.controllers) if self._cgroups is not None else []
        return {**self._config.requests.limits.to_dict(), "controllers": present,
                "missing": [c for c in cgroups.LIMITED_BY if c not in present]}


def requester_key(job: Job) -> tuple[int, str | None]:
    """Who a job is for, for fair share: its uid, and its hub user when one shares the uid."""
    return job.requester_uid, job.hub_user


def fair_order(queued: Sequence[Job], running: Iterable[Job],
               last_start: dict[tuple[int, str | None], float], slots: int) -> list[Job]:
    """The queued jobs the next ``slots`` free slots go to: each to the requester with the
    fewest builds running (counting those picked before it), then the one whose last build
    started longest ago, then the oldest job — round robin across requesters, first come
    first served within one."""
    load = Counter(requester_key(j) for j in running)
    waiting, chosen = list(queued), list[Job]()
    while waiting and len(chosen) < slots:
        job = min(waiting, key=lambda j: (load[requester_key(j)],
                                          last_start.get(requester_key(j), 0.0), j.created_at))
        waiting.remove(job)
        chosen.append(job)
        load[requester_key(job)] += 1
    return chosen


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
    return config._replace(requests=config.requests._replace(state_dir=state_dir))


def _ended(job: Job) -> Conflict:
    """A cancel that came too late: there is nothing left to cancel, and never will be (the
    default hint of a conflict, to wait and retry, would be wrong)."""
    return Conflict(f"job {job.id} has already ended ({job.state.value}): nothing to cancel",
                    hint=f"'envctl request status {job.id}' says how it ended")
