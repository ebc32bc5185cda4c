"""One build, from name lock to a frozen, tested version made current — or to nothing at all.

Why one class owns the whole sequence: the guarantees are about ordering. The name lock is
taken before anything is created and released only after the outcome is on disk; a new version
is built at its own path (``.envctl/envs/<name>/vN``, see ``envs``) while ``<root>/<name>``
keeps pointing at the current one; it is frozen (the daemon's, read-only, its digest taken:
see ``freeze``), the requester's ``--test`` commands pass inside the frozen version (what users
will get), its record says ``ready`` with the digest — and only then is the stable path
switched to it, by one atomic rename. Every way out before that (failure, a failing test,
cancel, timeout, daemon stop, crash recovery) goes through ``discard``, which removes the new
version and leaves the current one untouched and serving. Every backend goes the same way,
relocatable or not: the path a version is built at is the path it runs at.

Limits (``requests.limits``): memory, tasks and CPU share are the build cgroup's (``cgroup``);
when a step fails, the cgroup's counters say whether the kernel's OOM killer or a refused fork
did it, and the build's message names the limit. Disk is counted here: the new version and the
build's HOME (the places a step may write; and what its processes write there into files they
unlinked), walked while a step runs — every ``DISK_CHECK_S``,
or ten times as long as the last walk took, so that a huge tree costs at most a tenth of a
core — and after each step; past ``limits.disk`` the build is stopped and fails naming it.
A build's own log stops growing at 64M or a quarter of ``requests.max_log_bytes`` (the cap
of all kept logs), with a note, and the build goes on; what it writes past that is dropped at
most ``DRAIN_PIECE`` per ``DRAIN_PAUSE`` (a flood is slowed, never split into lines).
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import logging
import os
import select
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..config import BuildLimits, Config, format_size
from ..errors import BuildFailed, Conflict, EnvctlError, FilesystemError
from ..heal import fsops
from . import base_python, envs, freeze, kernels, layout, procs
from . import cgroup as cgroups
from .backends import (
    PHASE_MARK,
    PHASES,
    BuildContext,
    Step,
    backend_named,
    get_backend,
    rattler,
    rattler_child,
    test_step,
)
from .lock import NameLock
from .model import Job, State
from .spec import EnvSpec, parse_spec
from .store import JobStore

log = logging.getLogger(__name__)

MAX_LOG_BYTES = 64 << 20  # a runaway build cannot fill the state disk through its log
OUTPUT_PIECE = 64 << 10  # bytes of a step's output read at once, line break or not
DRAIN_PIECE = 1 << 20  # bytes dropped at once of a step's output past the log's cap,
DRAIN_PAUSE = 0.05  # then a pause: at most 20M/s of it
DISK_CHECK_S = 2.0  # least seconds between two walks counting a running build's disk use


@dataclass
class Outcome:
    """How a build ended, before it is written to the store."""

    state: State
    detail: str


class Aborted(Exception):
    """Raised inside a build when cancel, timeout or daemon stop asks it to end."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.detail)
        self.outcome = outcome


class Build:
    """Runs one job; ``abort`` may be called from any thread."""

    def __init__(self, job: Job, config: Config, store: JobStore, state_dir: layout.StateDir,
                 notify: Callable[[], None], cgroup_tree: cgroups.CgroupTree | None,
                 user: procs.BuildUser) -> None:
        self.job = job
        self.user = user  # this build's own uid, from the pool (see procs)
        self.config = config
        self.cfg = config.requests
        self.store = store
        self.state_dir = state_dir
        self.notify = notify
        self.area = layout.RootArea(config.requests_root.path)
        self.backend = get_backend(job.backend, self.cfg)
        self._abort: Outcome | None = None
        self._abort_event = threading.Event()
        self._wake = threading.Event()  # the running step's: set by abort() and by its end
        self._log_fd = state_dir.open_log(job.id)
        self._log_bytes = os.fstat(self._log_fd).st_size
        self._log_cap = min(MAX_LOG_BYTES, self.cfg.max_log_bytes // 4)
        self._log_lock = threading.Lock()
        self._cgroup_tree = cgroup_tree
        self._cgroup: cgroups.JobCgroup | None = None  # made before the first step, removed
        self._hits: dict[str, int] = {}  # the cgroup's limit counters after the last step
        self._disk_due = 0.0  # monotonic time of the next disk walk
        # a prefix (relative to .envctl) made for a trusted step and not handed over yet
        self._daemon_owned: str | None = None
        self.tests: list[str] = state_dir.read_tests(job.id)
        self.note = state_dir.read_note(job.id)  # the env's new description, the why

    # -- control from other threads ------------------------------------------------------------

    def abort(self, state: State, detail: str) -> None:
        if self._abort is None:
            self._abort = Outcome(state, detail)
        self._abort_event.set()
        self._wake.set()

    def _check_abort(self) -> None:
        if self._abort is not None:
            raise Aborted(self._abort)

    # -- the log ---------------------------------------------------------------------------------

    def say(self, text: str) -> None:
        """A daemon line in the build log (prefixed, so it is told apart from build output)."""
        self._write(f"[envctl {time.strftime('%H:%M:%S')}] {text}\n".encode())

    def _write(self, data: bytes) -> None:
        with self._log_lock:
            if self._log_fd < 0 or self._log_bytes >= self._log_cap:
                return  # closed: a process that escaped its group still writes to the pipe
            if self._log_bytes + len(data) >= self._log_cap:
                data = (data[:self._log_cap - self._log_bytes] + b"\n[envctl] log truncated at "
                        + format_size(self._log_cap).encode() + b" (a quarter of "
                        b"requests.max_log_bytes, at most 64M): the build goes on\n")
            self._log_bytes += os.write(self._log_fd, data)
        self.notify()

    def _phase(self, name: str) -> None:
        self.store.update(self.job.id, phase=name)
        self.notify()

    # -- the sequence ----------------------------------------------------------------------------

    def run(self) -> Outcome:
        """Build, heal, rename; always returns the outcome (never raises)."""
        job = self.job
        outcome = Outcome(State.FAILED, "internal error")
        try:
            self.say(f"job {job.id}: building {job.name!r} with backend {job.backend} "
                     f"for {job.requester_name} (uid {job.requester_uid}) on "
                     f"{socket.gethostname()}")
            user = self.user
            spec = parse_spec(self.store.spec_text(job.id), self.cfg, job.name)
            for note in spec.notes:
                self.say(note)
            with self.area.open() as fds:
                lock = NameLock(fds.locks, str(self.area.root), job.name, job.id)
                lock.acquire()
                try:
                    outcome = self._locked(fds, user, spec)
                except Exception as exc:
                    self._note_failure(fds, exc)
                    raise
                finally:
                    lock.release()
        except Aborted as exc:
            outcome = exc.outcome
        except EnvctlError as exc:
            outcome = Outcome(State.FAILED, exc.message + (f" ({exc.hint})" if exc.hint else ""))
        except OSError as exc:
            outcome = Outcome(State.FAILED, f"{exc.filename or 'build'}: {exc.strerror}")
        except Exception as exc:
            log.exception("job-crash id=%s", job.id)
            outcome = Outcome(State.FAILED, f"internal error: {type(exc).__name__}: {exc}")
        self._remove_cgroup()
        self.say(f"{outcome.state.value}: {outcome.detail}")
        with self._log_lock:
            os.close(self._log_fd)
            self._log_fd = -1
        return outcome

    def _locked(self, fds: layout.AreaFds, user: procs.BuildUser, spec: EnvSpec) -> Outcome:
        job = self.job
        with envs.env_dir(fds, job.name, create=True) as env_fd:
            assert env_fd is not None
            cur = envs.current(fds.root, job.name)
            self._clear_leftovers(env_fd, cur.version)
            if cur.kind == "unmanaged":
                raise Conflict(f"{job.prefix} is not an environment envctl manages (made by "
                               "hand): the daemon never replaces or moves it",
                               hint="pick another name, or move it away yourself")
            if cur.kind == "managed" and not job.replace:
                raise Conflict(f"{job.prefix} already exists", hint="request it with --replace")
            capped = envs.make_room(env_fd, job.name, cur.version, self.cfg.max_versions)
            if capped:
                self.say(f"removed {', '.join(capped)} of {job.name!r}: at most "
                         f"{self.cfg.max_versions} versions of an env are kept "
                         "(requests.max_versions)")
            version = envs.next_version(env_fd)
            try:
                ctx = self._prepare(env_fd, user, spec, version, cur)
                if job.backend == "venv" and self.cfg.venv_base is not None:
                    ctx = self._venv_base(fds, ctx, user)
                for step in self.backend.steps(ctx):
                    self._check_abort()
                    self._run_step(step, user, ctx)
                    if (ctx.job_dir / rattler_child.UNCHANGED_FILE).exists():
                        self.discard(env_fd, cur.version)
                        return Outcome(State.SUCCEEDED, f"no change: {cur.version} already "
                                       "has exactly these packages")
                self._check_abort()
                frozen = self._freeze(fds, env_fd, version, self.version_path(version))
                self._check_abort()
                self._test(ctx, user)  # against the frozen version: what users get
                self._check_abort()
                self._phase("finalizing")
                self._finalize(fds, env_fd, version, spec, frozen)
            except BaseException:
                self._phase("cleanup")
                self.discard(env_fd, cur.version)
                raise
        self._publish_kernel()
        return Outcome(State.SUCCEEDED, f"ready at {job.prefix} (version {version})")

    def _note_failure(self, fds: layout.AreaFds, exc: Exception) -> None:
        """A failure that is an existing env's own and not its request's (its tree, the
        filesystem, a bug: not a failed step or test, a refusal or a cancel) is recorded on
        the env (``envs.set_failure``; the name's lock still held): ``env list`` shows it to
        everyone until an update goes through."""
        if not _env_fault(exc):
            return
        with contextlib.suppress(OSError, EnvctlError):  # the job says it anyway
            if envs.current(fds.root, self.job.name).kind != "managed":
                return  # a first build: no env to report it on
            with envs.env_dir(fds, self.job.name, create=False) as env_fd:
                if env_fd is not None:
                    envs.set_failure(env_fd, self.job.name, "update",
                                     f"job {self.job.id}: {envs.failure_message(exc)}")

    def _venv_base(self, fds: layout.AreaFds, ctx: BuildContext,
                   user: procs.BuildUser) -> BuildContext:
        """The venv's base interpreter is the Python env the daemon keeps in the root
        (``requests.venv_base``), built here with rattler and frozen if this is the first venv
        that needs it (see ``base_python``); the venv is then created by it."""
        def build(base_fd: int, prefix: Path) -> freeze.Frozen:
            base = replace(ctx, prefix=prefix, spec=replace(ctx.spec, pip=()))  # python alone
            self._daemon_owned = f"base/{prefix.name}"  # its trusted step writes as us
            for step in backend_named("rattler").steps(base):
                self._check_abort()
                self._run_step(step, user, base)
            self._check_abort()
            return self._freeze(fds, base_fd, prefix.name, prefix)

        def wait(seconds: float) -> None:
            self._abort_event.wait(seconds)
            self._check_abort()

        python = base_python.ensure(fds, self.area, self.cfg, user, self.job.id, build,
                                    self.say, wait)
        return replace(ctx, cfg=ctx.cfg._replace(venv_python=str(python)))

    def _publish_kernel(self) -> None:
        """Write or remove the env's kernelspec now that its version is current (decided from
        the version's record: nothing of the env runs); the env is ready whatever happens."""
        said = kernels.refresh(self.config, self.job.name)
        if said is not None:
            self.say(said)

    def _clear_leftovers(self, env_fd: int, cur: str | None) -> None:
        """With the lock held, a version still ``building`` is a dead build's (here or on
        another host): remove it as its own daemon would have."""
        removed = envs.clear_dead(env_fd, cur)
        if removed:
            self.say(f"removed {', '.join(removed)} of {self.job.name!r}, left half-built by "
                     "an interrupted build")

    def _record(self, version: str, spec: EnvSpec) -> dict[str, Any]:
        """What ``vN.json`` says about the version (completed by ``_finalize``)."""
        job = self.job
        return {"format": envs.FORMAT, "name": job.name, "version": version, "job": job.id,
                "backend": job.backend, "host": socket.gethostname(),
                "requester": {"uid": job.requester_uid, "name": job.requester_name,
                              "hub_user": job.hub_user, "hub_id": job.hub_id,
                              "claimed_user": job.claimed_user},
                "created_at": time.time(), "spec": self.store.spec_text(job.id),
                "spec_channels": list(spec.channels), "spec_pip": list(spec.pip),
                "variables": dict(spec.variables),
                "tests": self.tests, "prefix": str(self.version_path(version)),
                "why": self.note["why"] or self.note["description"]
                or ("replace" if job.replace else "create")}

    def version_path(self, version: str) -> Path:
        return self.area.path("envs", self.job.name, version)

    def _prepare(self, env_fd: int, user: procs.BuildUser, spec: EnvSpec,
                 version: str, cur: envs.Current) -> BuildContext:
        job = self.job
        self._phase("preparing")
        files = {"environment.yml": self.store.spec_text(job.id),
                 **self.backend.files(spec, self.cfg)}
        if job.backend == "rattler" and job.replace and cur.version and not self.tests:
            # an unchanged --replace keeps the current version (``--test``: a new build)
            files.update(rattler.unchanged_if(envs.read_record(env_fd, f"{cur.version}.json"),
                                              spec, files["environment.yml"]))
        job_dir = self.state_dir.prepare_job(job.id, user.uid, user.gid, files)
        with self.area.open() as fds:
            cache = self.area.conda_cache(fds)
        prefix = self.version_path(version)
        ctx = BuildContext(spec=spec, cfg=self.cfg, job_dir=job_dir, home=job_dir / "home",
                           prefix=prefix, cache_dir=cache)
        first = self.backend.steps(ctx)[:1]
        # the version's first writer owns it: the daemon for a trusted step (hand_over gives
        # its directories to the build uid before a build-uid step writes there)
        owner = procs.daemon_user() if first and first[0].trusted else user
        envs.begin(env_fd, version, self._record(version, spec), owner.uid, owner.gid)
        if not owner.switch:
            self._daemon_owned = f"envs/{job.name}/{version}"
        self.say(f"building version {version} of {job.name!r} at {prefix}")
        return ctx

    def _test(self, ctx: BuildContext, user: procs.BuildUser) -> None:
        """The requester's ``--test`` commands, each inside the new version (activated, its
        ``bin`` first on PATH) as the build user; the first failure fails the job."""
        for n, command in enumerate(self.tests, 1):
            self._check_abort()
            self._run_step(test_step(ctx, self.job.name, command), user, ctx,
                           what=f"test {n} ({command!r})", site_env=False, writes=False)
        if self.tests:
            self.say(f"{len(self.tests)} test command(s) passed")

    def _job_cgroup(self) -> cgroups.JobCgroup | None:
        """The build's cgroup, with its limits: recorded with the job before it exists, so
        that a restarted daemon finds it whenever it may hold a process."""
        if self._cgroup is None and self._cgroup_tree is not None:
            self.store.update(self.job.id, cgroup=str(self._cgroup_tree.path(self.job.id)))
            self._cgroup = self._cgroup_tree.create(self.job.id, self.cfg.limits)
            self._hits = self._cgroup.hits()
        return self._cgroup

    def _limits_hit(self) -> dict[str, int]:
        """How often each cgroup limit (by its ``requests.limits`` key) refused the build
        since the last call: after every step, so a failure is blamed on its own step's."""
        if self._cgroup is None:
            return {}
        before, self._hits = self._hits, self._cgroup.hits()
        return {key: n - before.get(key, 0) for key, n in self._hits.items()
                if n > before.get(key, 0)}

    def _check_disk(self, ctx: BuildContext, now: bool = False) -> None:
        """Count what the build wrote (its version and HOME, and the files on their
        filesystems its processes hold unlinked: ``procs.unlinked_bytes``) when due, or
        ``now``; past ``limits.disk`` the build is aborted (failed, naming the limit)."""
        start = time.monotonic()
        if not now and start < self._disk_due:
            return
        places = (ctx.prefix, ctx.home)
        used = sum(tree_bytes(p) for p in places)
        if self._cgroup is not None:
            devices = {os.stat(p).st_dev for p in places if p.exists()}
            used += procs.unlinked_bytes(cgroups.members(self._cgroup.path), devices)
        self._disk_due = time.monotonic() + max(DISK_CHECK_S, 10 * (time.monotonic() - start))
        if used > self.cfg.limits.disk:
            self.abort(State.FAILED, f"the build exceeded {self.cfg.limits.named('disk')}: "
                       f"its version and HOME hold {format_size(used)} or more")

    def _remove_cgroup(self) -> None:
        if self._cgroup is None:
            return
        assert self._cgroup_tree is not None
        try:
            killed = self._cgroup_tree.discard(self._cgroup.path)
        except OSError as exc:
            log.warning("job-cgroup-remove id=%s path=%s error=%s", self.job.id,
                        self._cgroup.path, exc.strerror)
            return
        if killed:  # every step's end kills it already: only a bug leaves something here
            log.warning("job-cgroup-leftovers id=%s killed=%d", self.job.id, killed)
        self.store.update(self.job.id, cgroup=None)

    def _run_step(self, step: Step, user: procs.BuildUser, ctx: BuildContext,
                  what: str | None = None, site_env: bool = True, writes: bool = True) -> None:
        """One step: a trusted one as the daemon, any other as this build's uid, in its
        cgroup and, where the kernel allows, its mount namespace (see ``procs``), where it may
        write its HOME and — when it ``writes`` the version (a build step, not a test) —
        ``ctx.prefix``, plus the conda cache for a trusted step. ``site_env``: with the admin's
        ``requests.build_env`` (proxies, index URLs: for the package managers, never for the
        requester's commands)."""
        phase, argv = step.phase, list(step.argv)
        self._phase(phase)
        if writes and not step.trusted:
            self._hand_over(user)
        self.say(("run (trusted): " if step.trusted else "run: ") + " ".join(argv))
        cgroup = self._job_cgroup()
        # a trusted step's HOME is the daemon's job dir: root never writes where a build uid
        # may have planted a symlink
        home = ctx.job_dir if step.trusted else ctx.home
        sandbox = None
        if procs.namespaces() is None:
            places = [home, *([ctx.prefix] if writes else []),
                      *([ctx.cache_dir] if step.trusted else [])]
            sandbox = procs.Sandbox(procs.sandbox_places(self.config), tuple(places))
        since = time.time() - 1.0  # ctime granularity
        running = procs.spawn(argv, procs.daemon_user() if step.trusted else user, home,
                              cgroup, self.cfg.build_env if site_env else (), sandbox)
        proc = running.proc
        reader = threading.Thread(target=self._pump, args=(proc,), daemon=True,
                                  name=f"envctl-log-{self.job.id}")
        reader.start()
        deadline = (self.job.started_at or time.time()) + self.cfg.timeout
        wake = self._wake = threading.Event()
        watcher = _Exit(proc.pid, wake)  # the step's end is seen at once, not on a poll
        try:
            started = procs.start_time(proc.pid)
            self.store.update(self.job.id, build_uid=user.uid, pgid=proc.pid, pgid_start=started)
            running.release()  # only now, with its group on disk, does the command run
            while proc.poll() is None:
                if time.time() >= deadline:
                    self.abort(State.FAILED, f"timed out after {self.cfg.timeout:g}s "
                                             "(requests.timeout)")
                self._check_disk(ctx)
                if self._abort is not None:
                    self.say(f"stopping the build ({self._abort.detail})")
                    procs.kill_group(proc.pid, leader=proc)
                    break
                wake.wait(0.1)
        finally:
            running.close_gate()
            procs.kill_group(proc.pid, grace=0, leader=proc)  # nothing of a step outlives it
            running.wait()
            watcher.close()
            # nor anything that left its group: all of it is in the cgroup, if there is one;
            # the sweep reaps what that leaves us (and is all there is without a cgroup)
            escaped = (cgroups.kill(cgroup.path) if cgroup is not None else 0) + procs.sweep(user)
            reader.join(5)  # after the kills: an escapee may hold the output pipe
            self.store.update(self.job.id, pgid=None, pgid_start=None)
            if escaped:
                self.say(f"killed {escaped} build process(es) that had left the build's "
                         "process group")
                log.warning("job-escapees id=%s killed=%d", self.job.id, escaped)
            if step.trusted:
                with self.area.open() as fds:
                    layout.seal_cache(fds, since)
        self._check_disk(ctx, now=True)
        self._check_abort()
        hit = self._limits_hit()
        if proc.returncode != 0:
            if hit:
                raise _exceeded(self.cfg.limits, hit, what or f"the {phase} step")
            how = (f"{what} failed with status" if what else
                   f"{phase} step failed: {Path(argv[0]).name} exited with status")
            raise BuildFailed(f"{how} {proc.returncode}", hint="see the build log")

    def _hand_over(self, user: procs.BuildUser) -> None:
        """Before a build-uid step writes the prefix a trusted step made (a version, or the
        venv base): its directories become the build uid's (``layout.hand_over``)."""
        rel, self._daemon_owned = self._daemon_owned, None
        if rel is None:
            return
        parent, _, name = rel.rpartition("/")
        with self.area.open() as fds:
            parent_fd = fsops.open_dir(fds.area, parent)
            try:
                changed = layout.hand_over(parent_fd, name, user.uid, user.gid)
            finally:
                os.close(parent_fd)
        log.debug("job-hand-over id=%s prefix=%s dirs=%d", self.job.id, rel, changed)

    def _pump(self, proc: subprocess.Popen[bytes]) -> None:
        """Copy the step's output to the log; turn ``ENVCTL-PHASE x`` lines into phases.

        Read in pieces of at most ``OUTPUT_PIECE``, whole lines written at once: one line
        without end (``head -c 5G /dev/zero``) read whole grew in the daemon's memory, where
        no build limit applies, and ``yes`` read line by line cost Python work per two bytes
        under the daemon's one GIL (a 64M log of it, a minute of the daemon's CPU)."""
        assert isinstance(proc.stdout, io.BufferedReader)
        pending = b""  # the start of a line not ended yet
        at_start = True  # ``pending`` begins a line
        while chunk := proc.stdout.read1(OUTPUT_PIECE):
            if self._log_fd < 0:
                break  # the job is over; only an escaped process can still be writing
            if self._log_bytes >= self._log_cap:
                _drain(proc.stdout.fileno())
                break
            pending += chunk
            cut = pending.rfind(b"\n") + 1 or (len(pending) if len(pending) >= OUTPUT_PIECE
                                                else 0)
            if cut:
                self._emit(pending[:cut], at_start)
                at_start = pending[cut - 1:cut] == b"\n"
                pending = pending[cut:]
        if pending and self._log_fd >= 0:
            self._emit(pending, at_start)
        proc.stdout.close()

    def _emit(self, text: bytes, at_start: bool) -> None:
        """Output into the log, but for the phase marks at a line's start (ours, never
        logged): they become the job's phase."""
        mark = PHASE_MARK.encode()
        if mark not in text:
            self._write(text)
            return
        for i, line in enumerate(text.splitlines(keepends=True)):
            if (i or at_start) and line.startswith(mark):
                name = line[len(mark):].decode("ascii", "replace").strip()
                if name in PHASES:
                    self._phase(name)
                continue
            self._write(line)

    def _freeze(self, fds: layout.AreaFds, dir_fd: int, name: str,
                shown: Path) -> freeze.Frozen:
        """Make the built prefix ``name`` in ``dir_fd`` (at ``shown``) the daemon's and
        read-only (see ``freeze``), its files shared through the root's store; returns its
        digest."""
        self._phase("freezing")
        target = freeze.Target.of(self.config.requests_root)
        store = freeze.Store.in_area(self.area, fds.area, target)
        try:
            frozen = freeze.freeze(dir_fd, name, target, str(shown), store)
        finally:
            store.close()
        self.say(f"froze {shown}: {frozen.entries} entries, {frozen.linked} file(s) shared "
                 f"with the store, digest {frozen.digest}")
        return frozen

    def _finalize(self, fds: layout.AreaFds, env_fd: int, version: str,
                  spec: EnvSpec, frozen: freeze.Frozen) -> None:
        """Inventory the version, mark it ready, then switch the stable path to it."""
        job = self.job
        record = {**self._record(version, spec), **envs.ready_fields(env_fd, version),
                  **frozen.fields()}
        envs.write_record(env_fd, f"{version}.json", record)
        self._check_abort()  # the last moment a cancel can still keep the current version
        previous = envs.switch(fds.root, env_fd, job.name, version, owner=record["requester"],
                               description=self.note["description"])
        self.say(f"{job.prefix} now points to {version} ({len(record['packages'])} packages, "
                 f"{record['entries']} entries)" + (f"; {previous} stays on disk until GC"
                                         if previous else ""))

    def discard(self, env_fd: int, keep: str | None) -> None:
        """Remove this job's new version (idempotent); ``keep`` (the current one) never."""
        for version in envs.clear_dead(env_fd, keep, job_id=self.job.id):
            self.say(f"removed the unfinished version {version}")


def _env_fault(exc: BaseException) -> bool:
    """Whether a build's failure is the env's own trouble rather than its request's: the
    filesystem, the env's tree, a bug — not a failed step or test, a refusal or a cancel."""
    return isinstance(exc, FilesystemError) or not isinstance(exc, (EnvctlError, Aborted))


class _Exit:
    """Sets ``wake`` when process ``pid`` (a child not yet reaped) exits: a thread blocked on
    its pidfd. Without pidfds (an old kernel) it does nothing: the step loop's 0.1 s timeout
    sees the end."""

    def __init__(self, pid: int, wake: threading.Event) -> None:
        try:
            self._fd = os.pidfd_open(pid)
        except OSError:
            self._fd, self._thread = -1, None
            return
        self._thread = threading.Thread(target=self._run, args=(wake,), daemon=True,
                                        name=f"envctl-exit-{pid}")
        self._thread.start()

    def _run(self, wake: threading.Event) -> None:
        select.select([self._fd], [], [])
        wake.set()

    def close(self) -> None:
        """After the process has exited (the pidfd is readable: the thread ends)."""
        if self._thread is not None:
            self._thread.join()
        if self._fd >= 0:
            os.close(self._fd)


def _drain(pipe: int) -> None:
    """Drop what a step writes past its log's cap, to its end, at most ``DRAIN_PIECE`` per
    ``DRAIN_PAUSE``: read as it came, line by line, ``yes`` cost the daemon Python work per
    two bytes under its one GIL (and copying as fast as ``yes`` writes a core of its own) for
    as long as the step ran. The step is slowed only when it writes faster than that, and
    only its output nobody keeps (phase marks past the cap go too). The kernel moves the
    pipe's pages to ``/dev/null`` (``splice``): nothing is copied into the daemon."""
    with contextlib.suppress(OSError):  # a bigger pipe: fewer calls (best effort)
        fcntl.fcntl(pipe, fcntl.F_SETPIPE_SZ, DRAIN_PIECE)
    sink = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    try:
        while os.splice(pipe, sink, DRAIN_PIECE):
            time.sleep(DRAIN_PAUSE)
    finally:
        os.close(sink)


def _exceeded(limits: BuildLimits, hit: dict[str, int], what: str) -> BuildFailed:
    """The failure of a step a cgroup limit stopped (``hit``: ``Build._limits_hit``)."""
    if "memory" in hit:
        return BuildFailed(f"the build exceeded {limits.named('memory')}: the kernel killed a "
                           f"process of {what} that wanted more memory",
                           hint="build less at once, or ask an admin to raise the limit")
    return BuildFailed(f"the build exceeded {limits.named('tasks')}: the kernel refused {what} "
                       f"{hit['tasks']} new process(es) or thread(s)",
                       hint="start fewer at once, or ask an admin to raise the limit")


def tree_bytes(path: Path) -> int:
    """Bytes below ``path`` (a directory a build may be writing: never followed if a
    symlink); 0 when it is not there (yet)."""
    try:
        fd = os.open(path, fsops.DIR_FLAGS)
    except (FileNotFoundError, NotADirectoryError):
        return 0
    try:
        return envs.tree_size(fd, racing=True, allocated=True)[0]
    finally:
        os.close(fd)


def discard(job: Job, fds: layout.AreaFds, say: Callable[[str], None]) -> None:
    """Undo a dead job's build (crash recovery; the caller holds the name's lock): its
    versions that are not current, and whatever else a dead build left of that name."""
    with envs.env_dir(fds, job.name, create=False) as env_fd:
        if env_fd is None:
            return
        cur = envs.current(fds.root, job.name).version
        for version in envs.clear_dead(env_fd, cur, job_id=job.id):
            say(f"removed the unfinished version {version} of {job.name!r}")
