"""One build, from name lock to a healed prefix under its final name — or to nothing at all.

Why one class owns the whole sequence: the guarantees are about ordering. The name lock is
taken before anything is created and released only after the outcome is on disk; the output
is healed (and re-checked with a dry run: zero violations left) before it gets its final name;
an old environment being replaced is removed only after the new one is in place; and every way
out (failure, cancel, timeout, daemon stop, crash recovery) goes through ``discard``, which
removes partial output and puts a replaced environment back.

Relocatable backends (rattler) build in ``<root>/.envctl/staging/<job>`` and are renamed into
place with ``renameat2``: ``RENAME_NOREPLACE`` for a new name (a directory someone created
meanwhile is never clobbered), ``RENAME_EXCHANGE`` for ``replace`` (atomic swap; the old env
lands in staging and is removed after). Filesystems without ``renameat2`` (NFS) fall back to
check-then-rename, and to rename-old-aside + rename-new-in for replace. Non-relocatable backends
(venv, conda family) build at ``<root>/<name>`` behind the marker ``.envctl/building/<name>``
(holding the job id); with ``replace`` the old env is first moved to ``staging/<job>.old`` and
moved back if the build does not succeed.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import re
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from ..config import Config
from ..errors import BuildFailed, Conflict, EnvctlError
from ..fsinfo import walk_concurrency
from ..heal import Healer
from . import cgroup as cgroups
from . import kernels, layout, procs
from .backends import PHASE_MARK, PHASES, BuildContext, get_backend
from .lock import NameLock
from .model import Job, State
from .spec import EnvSpec, parse_spec
from .store import JobStore

log = logging.getLogger(__name__)

MAX_LOG_BYTES = 64 << 20  # a runaway build cannot fill the state disk through its log
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
_JOB_ID = re.compile(r"[0-9a-f]{1,32}")
_libc = ctypes.CDLL(None, use_errno=True)
_renameat2 = getattr(_libc, "renameat2", None)


def renameat2(src_fd: int, src: str, dst_fd: int, dst: str, flags: int) -> bool:
    """renameat2(2); False when the kernel or filesystem does not support ``flags``."""
    if _renameat2 is None:
        return False
    if _renameat2(src_fd, src.encode(), dst_fd, dst.encode(), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), dst)


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
                 notify: Callable[[], None], cgroup_tree: cgroups.CgroupTree | None) -> None:
        self.job = job
        self.config = config
        self.cfg = config.requests
        self.store = store
        self.state_dir = state_dir
        self.notify = notify
        self.area = layout.RootArea(config.requests_root.path)
        self.backend = get_backend(job.backend, self.cfg)
        self._abort: Outcome | None = None
        self._abort_event = threading.Event()
        self._log_fd = state_dir.open_log(job.id)
        self._log_bytes = os.fstat(self._log_fd).st_size
        self._log_lock = threading.Lock()
        self._cgroup_tree = cgroup_tree
        self._cgroup: Path | None = None  # made before the first step, removed at the end

    # -- control from other threads ------------------------------------------------------------

    def abort(self, state: State, detail: str) -> None:
        if self._abort is None:
            self._abort = Outcome(state, detail)
        self._abort_event.set()

    def _check_abort(self) -> None:
        if self._abort is not None:
            raise Aborted(self._abort)

    # -- the log ---------------------------------------------------------------------------------

    def say(self, text: str) -> None:
        """A daemon line in the build log (prefixed, so it is told apart from build output)."""
        self._write(f"[envctl {time.strftime('%H:%M:%S')}] {text}\n".encode())

    def _write(self, data: bytes) -> None:
        with self._log_lock:
            if self._log_fd < 0 or self._log_bytes >= MAX_LOG_BYTES:
                return  # closed: a process that escaped its group still writes to the pipe
            if self._log_bytes + len(data) >= MAX_LOG_BYTES:
                data = data[:MAX_LOG_BYTES - self._log_bytes] + b"\n[envctl] log truncated\n"
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
            user = procs.build_user(self.cfg)
            spec = parse_spec(self.store.spec_text(job.id), self.cfg)
            with self.area.open() as fds:
                lock = NameLock(fds["locks"], str(self.area.root), job.name, job.id)
                lock.acquire()
                try:
                    outcome = self._locked(fds, user, spec)
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

    def _locked(self, fds: dict[str, int], user: procs.BuildUser, spec: EnvSpec) -> Outcome:
        job, relocatable = self.job, self.backend.relocatable
        self._clear_leftovers(fds)
        if layout.exists(fds[""], job.name) and not job.replace:
            raise Conflict(f"{job.prefix} already exists", hint="request it with --replace")
        try:
            ctx = self._prepare(fds, user, spec)
            for step in self.backend.steps(ctx):
                self._check_abort()
                self._run_step(step.phase, list(step.argv), user, ctx.home)
            self._check_abort()
            kernel = self._probe_kernel(ctx, user)
            self._phase("healing")
            rel = self.area.staging_rel(job.id) if relocatable else job.name
            self._heal(rel)
            self._check_abort()
            self._phase("finalizing")
            self._finalize(fds)
        except BaseException:
            self._phase("cleanup")
            self.discard(fds)
            raise
        self._publish_kernel(kernel)
        return Outcome(State.SUCCEEDED, f"ready at {job.prefix}")

    def _probe_kernel(self, ctx: BuildContext, user: procs.BuildUser) -> bool | None:
        """Whether the new env has ipykernel (its python asked as the build user, before the
        healing pass), or None when no kernels.dir is configured."""
        if self.config.kernels.dir is None:
            return None
        return kernels.probe(ctx.build_prefix, user, ctx.home, self._job_cgroup(),
                             self._abort_event)

    def _publish_kernel(self, kernel: bool | None) -> None:
        """Write or remove the env's kernelspec now that it is in place; a failure here is
        logged and said, but the env is ready all the same (``kernels sync`` repairs it)."""
        if kernel is None:
            return
        try:
            self.say(kernels.publish(self.config, self.job.name, kernel))
        except (OSError, EnvctlError) as exc:
            self.say(f"kernelspec not written: {exc}")
            log.warning("job-kernelspec id=%s name=%s error=%s", self.job.id, self.job.name,
                        exc)

    def _clear_leftovers(self, fds: dict[str, int]) -> None:
        """With the lock held, a marker for this name means a dead build (here or on another
        host) left a half-built prefix: undo it as its own daemon would have."""
        owner = _marker_job(fds, self.job.name)
        if owner is None:
            return
        self.say(f"undoing an interrupted build of {self.job.name!r} (job {owner})")
        discard(replace(self.job, id=owner), False, fds, self.say)

    def _prepare(self, fds: dict[str, int], user: procs.BuildUser, spec: EnvSpec) -> BuildContext:
        job = self.job
        self._phase("preparing")
        files = {"environment.yml": self.store.spec_text(job.id),
                 **self.backend.files(spec, self.cfg)}
        job_dir = self.state_dir.prepare_job(job.id, user.uid, user.gid, files)
        cache = self.state_dir.cache_dir(user.uid, user.gid)
        final = Path(job.prefix)
        if self.backend.relocatable:
            layout.make_owned_dir(fds["staging"], job.id, user.uid, user.gid, 0o755)
            build_prefix = self.area.path("staging", job.id)
        else:
            if job.replace and layout.exists(fds[""], job.name):
                os.rename(job.name, f"{job.id}.old", src_dir_fd=fds[""],
                          dst_dir_fd=fds["staging"])
                self.say(f"moved the existing {job.name!r} aside until the new one is ready")
            marker = os.open(job.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                             | os.O_CLOEXEC, 0o644, dir_fd=fds["building"])
            os.write(marker, f"{job.id} {socket.gethostname()} {os.getpid()}\n".encode())
            os.close(marker)
            try:
                layout.make_owned_dir(fds[""], job.name, user.uid, user.gid, 0o755)
            except FileExistsError:  # created meanwhile: not ours, so discard must not touch it
                os.unlink(job.name, dir_fd=fds["building"])
                raise Conflict(f"{job.prefix} appeared before the build started") from None
            build_prefix = final
        return BuildContext(spec=spec, cfg=self.cfg, job_dir=job_dir, home=job_dir / "home",
                            build_prefix=build_prefix, final_prefix=final, cache_dir=cache)

    def _job_cgroup(self) -> Path | None:
        """The build's cgroup: recorded with the job before it exists, so that a restarted
        daemon finds it whenever it may hold a process."""
        if self._cgroup is None and self._cgroup_tree is not None:
            self.store.update(self.job.id, cgroup=str(self._cgroup_tree.path(self.job.id)))
            self._cgroup = self._cgroup_tree.create(self.job.id)
        return self._cgroup

    def _remove_cgroup(self) -> None:
        if self._cgroup is None:
            return
        assert self._cgroup_tree is not None
        try:
            killed = self._cgroup_tree.discard(self._cgroup)
        except OSError as exc:
            log.warning("job-cgroup-remove id=%s path=%s error=%s", self.job.id, self._cgroup,
                        exc.strerror)
            return
        if killed:  # every step's end kills it already: only a bug leaves something here
            log.warning("job-cgroup-leftovers id=%s killed=%d", self.job.id, killed)
        self.store.update(self.job.id, cgroup=None)

    def _run_step(self, phase: str, argv: list[str], user: procs.BuildUser, home: Path) -> None:
        self._phase(phase)
        self.say("run: " + " ".join(argv))
        cgroup = self._job_cgroup()
        step = procs.spawn(argv, user, home, cgroup)
        proc = step.proc
        reader = threading.Thread(target=self._pump, args=(proc,), daemon=True,
                                  name=f"envctl-log-{self.job.id}")
        reader.start()
        deadline = (self.job.started_at or time.time()) + self.cfg.timeout
        try:
            started = procs.start_time(proc.pid)
            self.store.update(self.job.id, build_uid=user.uid, pgid=proc.pid, pgid_start=started)
            step.release()  # only now, with its group on disk, does the command run
            while proc.poll() is None:
                if time.time() >= deadline:
                    self.abort(State.FAILED, f"timed out after {self.cfg.timeout:g}s "
                                             "(requests.timeout)")
                if self._abort is not None:
                    self.say(f"stopping the build ({self._abort.detail})")
                    procs.kill_group(proc.pid, leader=proc)
                    break
                self._abort_event.wait(0.1)
        finally:
            step.close_gate()
            procs.kill_group(proc.pid, grace=0, leader=proc)  # nothing of a step outlives it
            step.wait()
            # nor anything that left its group: all of it is in the cgroup, if there is one;
            # the sweep reaps what that leaves us (and is all there is without a cgroup)
            escaped = (cgroups.kill(cgroup) if cgroup is not None else 0) + procs.sweep(user)
            reader.join(5)  # after the kills: an escapee may hold the output pipe
            self.store.update(self.job.id, pgid=None, pgid_start=None)
            if escaped:
                self.say(f"killed {escaped} build process(es) that had left the build's "
                         "process group")
                log.warning("job-escapees id=%s killed=%d", self.job.id, escaped)
        self._check_abort()
        if proc.returncode != 0:
            raise BuildFailed(f"{phase} step failed: {Path(argv[0]).name} exited with status "
                              f"{proc.returncode}", hint="see the build log")

    def _pump(self, proc: subprocess.Popen[bytes]) -> None:
        """Copy the step's output to the log; turn ``ENVCTL-PHASE x`` lines into phases."""
        assert proc.stdout is not None
        for line in proc.stdout:
            if self._log_fd < 0:
                break  # the job is over; only an escaped process can still be writing
            if line.startswith(PHASE_MARK.encode()):
                name = line[len(PHASE_MARK):].decode("ascii", "replace").strip()
                if name in PHASES:
                    self._phase(name)
            self._write(line)
        proc.stdout.close()

    def _heal(self, rel: str) -> None:
        """Heal the new prefix with the root's policy, then prove nothing is left to fix.

        The root's ``exclude`` patterns are not applied: they protect users' content from the
        healer, while this tree is brand new and entirely the daemon's (and ``.envctl`` itself
        may well be excluded by the admin).
        """
        root = replace(self.config.requests_root, exclude=())
        workers = walk_concurrency(root.path, self.config.walk.concurrency)
        stats = Healer(root, concurrency=workers).run(rel)
        left = Healer(root, dry_run=True, concurrency=workers).run(rel)
        self.say(f"healed {rel}: scanned={stats.scanned} fixed={stats.writes} "
                 f"errors={stats.errors} left={left.violations}")
        if stats.errors or left.violations or left.errors:
            raise BuildFailed(f"the new environment could not be healed ({stats.errors} errors, "
                              f"{left.violations} violations left)", hint="see the build log")

    def _finalize(self, fds: dict[str, int]) -> None:
        job = self.job
        if self.backend.relocatable:
            if job.replace and layout.exists(fds[""], job.name):
                if not renameat2(fds["staging"], job.id, fds[""], job.name, RENAME_EXCHANGE):
                    os.rename(job.name, f"{job.id}.old", src_dir_fd=fds[""],
                              dst_dir_fd=fds["staging"])
                    os.rename(job.id, job.name, src_dir_fd=fds["staging"], dst_dir_fd=fds[""])
                else:
                    os.rename(job.id, f"{job.id}.old", src_dir_fd=fds["staging"],
                              dst_dir_fd=fds["staging"])
            elif not renameat2(fds["staging"], job.id, fds[""], job.name, RENAME_NOREPLACE):
                if layout.exists(fds[""], job.name):
                    raise Conflict(f"{job.prefix} appeared during the build")
                os.rename(job.id, job.name, src_dir_fd=fds["staging"], dst_dir_fd=fds[""])
        else:
            os.unlink(job.name, dir_fd=fds["building"])
        if layout.remove_tree(fds["staging"], f"{job.id}.old"):
            self.say(f"removed the previous {job.name!r}")

    def discard(self, fds: dict[str, int]) -> None:
        """Remove this job's partial output and restore a replaced env (idempotent)."""
        discard(self.job, self.backend.relocatable, fds, self.say)


def discard(job: Job, relocatable: bool, fds: dict[str, int],
            say: Callable[[str], None]) -> None:
    """Undo a build that did not succeed; also used by crash recovery (lock held by caller)."""
    if layout.remove_tree(fds["staging"], job.id):
        say(f"removed staging prefix .envctl/staging/{job.id}")
    if not relocatable and _marker_job(fds, job.name) == job.id:
        layout.remove_tree(fds[""], job.name)
        os.unlink(job.name, dir_fd=fds["building"])
        say(f"removed the partial {job.prefix}")
    if layout.exists(fds["staging"], f"{job.id}.old") and not layout.exists(fds[""], job.name):
        os.rename(f"{job.id}.old", job.name, src_dir_fd=fds["staging"], dst_dir_fd=fds[""])
        say(f"restored the previous {job.name!r}")


def _marker_job(fds: dict[str, int], name: str) -> str | None:
    """The job id in ``.envctl/building/<name>``, or None when there is no marker."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fds["building"])
    except FileNotFoundError:
        return None
    try:
        owner = os.read(fd, 256).decode("utf-8", "replace").split(" ")[0].strip()
    finally:
        os.close(fd)
    return owner if _JOB_ID.fullmatch(owner) else "unknown"
