"""The composition root: one :class:`Daemon` owns every root's watcher and the request side.

Why here and nowhere else: the layers below (watch, jobs, api) do not know about each other;
this module wires them together, applies a reloaded config as a diff (an unchanged root keeps
its watches and counters; a changed or new one is started afresh, which includes its full
reconcile), and answers the two questions the service manager and ``envctl status`` ask: how
is every root doing (``status``), and is everything still making progress (``heartbeat``). A root
that can no longer be kept correct in real time (its watch cannot be rebuilt, one of its threads
died) sets ``failure``: the daemon is then not ready, and ``main`` exits non-zero so that the
service manager restarts it.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
import time
from collections.abc import Callable
from typing import Any, Protocol

from .. import __version__
from ..api.protocol import VERSION as PROTOCOL
from ..config import Config, RootConfig
from ..errors import EnvctlError
from ..fsinfo import mount_of, walk_concurrency
from ..logfields import Subject
from ..status import DaemonStatus, InotifyBudget
from ..watch import RootWatcher, max_user_watches
from .leader import PollerLease
from .preflight import root_problems

log = logging.getLogger(__name__)
# Warn when the roots alone need more than this share of the limit: the daemon's uid (root,
# usually) shares it with every other process of that uid, and trees grow.
WATCH_HEADROOM = 0.8


class _Environments(Protocol):
    integrity: dict[str, Any]
    area: dict[str, str] | None

    def failure_line(self) -> str | None: ...


class _Jobs(Protocol):
    containment: str
    sandbox: str

    def start(self) -> None: ...
    def stop(self, timeout: float) -> Any: ...
    def reload(self, config: Config) -> None: ...
    def counts(self) -> dict[str, int]: ...
    def max_builds(self) -> int: ...
    def cluster(self) -> dict[str, str] | None: ...
    def limits(self) -> dict[str, Any]: ...
    @property
    def environments(self) -> _Environments: ...


class _Server(Protocol):
    def start(self, listen_sock: socket.socket | None) -> None: ...
    def stop(self) -> None: ...
    def reload(self, config: Config, jobs: Any) -> None: ...
    def heartbeat(self) -> float: ...


def check_roots(config: Config) -> None:
    """Refuse a config whose roots do not exist (before anything is started or replaced)."""
    for problem in root_problems(config):
        raise problem


class Daemon:
    """Every root watched and healed, plus (when enabled) the job manager and the API server."""

    def __init__(self, config: Config, wedge_after: float | None = None,
                 on_failure: Callable[[], None] | None = None) -> None:
        """``on_failure`` is called (from any thread) once ``failure`` is set."""
        self.config = config
        self._wedge_after = wedge_after
        self._on_failure = on_failure
        self.failure: str | None = None
        self._roots: dict[str, RootWatcher] = {}
        self._leases: dict[str, PollerLease] = {}  # per root: who polls it, cluster-wide
        self._jobs: _Jobs | None = None
        self._server: _Server | None = None
        self._started = time.time()
        self.ready = False

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self, listen_sock: socket.socket | None = None) -> None:
        """Watch and reconcile every root, then open the request side. Returns when ready."""
        check_roots(self.config)
        for root in self.config.roots:
            self._start_root(root)
        self._log_watch_budget()
        self._jobs = _start_jobs(self.config) if self.config.requests.enabled else None
        self._server = _start_server(self.config, self._jobs, self.status, listen_sock)
        self.ready = self.failure is None

    def _start_root(self, root: RootConfig) -> None:
        concurrency = walk_concurrency(root.path, self.config.walk.concurrency)
        # Other hosts write only to network filesystems: on a local disk every writer is on
        # this host, its inotify sees them all, and there is nothing to share out.
        lease = PollerLease(root.path) if mount_of(root.path).remote else None
        watcher = RootWatcher(root, self.config.watch, concurrency, self._wedge_after,
                              on_fatal=lambda reason: self._root_failed(root, reason),
                              gate=lease)
        t0 = time.monotonic()
        try:
            watcher.start()
        except BaseException:
            if lease is not None:
                lease.close()
            raise
        self._roots[str(root.path)] = watcher
        if lease is not None:
            self._leases[str(root.path)] = lease
        st = watcher.status()
        said = Subject(log, root=root.path)
        said.info("watching mode=%s watches=%d scanned=%d fixed=%d start=%.3f poller=%s", st.mode,
                  st.watches, st.scanned, st.fixed, time.monotonic() - t0,
                  lease.role if lease else "-")
        # Healed as the rules say, and still writable by everyone (others: keep): any user of
        # the host, not only the group, adds entries — an admin's choice the daemon keeps, and
        # says once at start, for a root is seldom meant to be so (doctor flags it too).
        mode = stat.S_IMODE(os.stat(root.path).st_mode)
        if mode & stat.S_IWOTH:
            said.warning("root-writable-by-everyone mode=%04o others=%s hint=%s", mode,
                         root.others, f"'chmod o-w {root.path}', or roots[].others: read")

    def inotify_budget(self) -> InotifyBudget:
        """The inotify watches every root needs (one per directory) against the kernel's
        per-user limit, which every process of the daemon's uid shares."""
        needed = [w.status(watches=False).watches_needed for w in self._roots.values()]
        return InotifyBudget(needed=sum(n or 0 for n in needed),
                             max_user_watches=max_user_watches())

    def _log_watch_budget(self) -> None:
        """One line at start: what the roots need against the limit; a WARNING with the
        value to set when the limit is close or a root already fell back to polling for
        want of watches (other processes of this uid held the rest)."""
        budget = self.inotify_budget()
        needed, limit = budget.needed, budget.max_user_watches
        roots = [w.status(watches=True) for w in self._roots.values()]
        starved = any(r.watches_needed and "inotify" not in r.mode for r in roots)
        short = limit is not None and (starved or needed > WATCH_HEADROOM * limit)
        held = sum(r.watches or 0 for r in roots)
        want = max(int(needed / WATCH_HEADROOM), (limit or 0) + needed - held)
        log.log(logging.WARNING if short else logging.INFO,
                "inotify watches needed=%d max_user_watches=%s%s", needed,
                limit if limit is not None else "unknown",
                f" hint=raise fs.inotify.max_user_watches above {want}" if short else "")

    def _root_failed(self, root: RootConfig, reason: str) -> None:
        if self.failure is None:
            self.failure = f"root {root.path}: {reason}"
        self.ready = False
        if self._on_failure is not None:
            self._on_failure()

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop taking requests, drain every root's queue, stop everything. True if drained."""
        self.ready = False
        if self._server is not None:
            self._server.stop()
        if self._jobs is not None:
            self._jobs.stop(timeout)
        drained = True
        for path in list(self._roots):
            drained = self._unwatch(path, timeout) and drained
        return drained

    def _unwatch(self, path: str, timeout: float = 10.0) -> bool:
        """Stop one root's watcher, then give up its poller lock (another daemon takes it
        over at its next attempt instead of waiting for this process to exit)."""
        drained = self._roots.pop(path).stop(timeout)
        lease = self._leases.pop(path, None)
        if lease is not None:
            lease.close()
        return drained

    def reload(self, new: Config) -> None:
        """Apply ``new`` as a diff; raises (before changing anything) if it cannot be used."""
        check_roots(new)
        same_watch = (new.watch, new.walk) == (self.config.watch, self.config.walk)
        wanted = {str(r.path): r for r in new.roots}
        for path, watcher in list(self._roots.items()):
            if path not in wanted or not same_watch or watcher.root != wanted[path]:
                self._unwatch(path)
                Subject(log, root=path).info("unwatched")
        self.config = new
        for path, root in wanted.items():
            if path not in self._roots:
                try:
                    self._start_root(root)
                except EnvctlError as exc:
                    Subject(log, root=path).error("cannot watch error=%s", exc.message)
        if not new.requests.enabled and self._jobs is not None:
            self._jobs.stop(10.0)  # switched off: running builds end as interrupted
            self._jobs = None
        elif new.requests.enabled and self._jobs is None:
            self._jobs = _start_jobs(new)
        elif self._jobs is not None:
            self._jobs.reload(new)
        if self._server is not None:
            self._server.reload(new, self._jobs)

    # -- what systemd, the API and the log see -------------------------------------------------

    def heartbeat(self) -> float:
        """Monotonic time of the stalest component's last progress (workers, pollers, server)."""
        beats = [w.heartbeat() for w in self._roots.values()]
        if self._server is not None:
            beats.append(self._server.heartbeat())
        return min(beats) if beats else time.monotonic()

    def status(self, watches: bool = True) -> DaemonStatus:
        """Every root's counters, the job side, the daemon's identity (``to_dict``: the JSON
        the ``status`` op replies). Not ``ready`` while the requests root's area cannot be
        trusted (``area``: path, problem, fix; the daemon runs on and takes requests again once
        it is fixed); ``failure`` is the daemon's own, else the environments'
        (``EnvService.failure_line``: GC or update of one env failed; the daemon is ready)."""
        jobs = self._jobs
        envs = jobs.environments if jobs is not None else None
        area = envs.area if envs is not None else None
        return DaemonStatus(
            version=__version__, protocol=PROTOCOL, pid=os.getpid(),
            ready=self.ready and area is None,
            failure=self.failure or (envs.failure_line() if envs is not None else None),
            area=area, config=self.config.source,
            uptime_s=round(time.time() - self._started, 1),
            progress_age_s=round(time.monotonic() - self.heartbeat(), 1),
            requests_enabled=jobs is not None,
            containment=jobs.containment if jobs is not None else None,
            sandbox=jobs.sandbox if jobs is not None else None,
            max_builds=jobs.max_builds() if jobs is not None else None,
            limits=jobs.limits() if jobs is not None else None,
            jobs=jobs.counts() if jobs is not None else None,
            cluster=jobs.cluster() if jobs is not None else None,
            integrity=envs.integrity if envs is not None else None,
            inotify=self.inotify_budget(),
            roots=[w.status(watches) for w in self._roots.values()])

    def wait_idle(self, timeout: float) -> bool:
        """True once every root's queue is empty and no heal is running."""
        deadline = time.monotonic() + timeout
        return all(w.wait_idle(max(0.0, deadline - time.monotonic()))
                   for w in list(self._roots.values()))

    def summary(self) -> str:
        """One line for systemd's STATUS=."""
        st = self.status(watches=False)
        roots = st.roots
        modes = sorted({r.mode for r in roots})
        line = (f"roots={len(roots)} mode={','.join(modes) or '-'} "
                f"fixed={sum(r.fixed for r in roots)} queue={sum(r.queue for r in roots)} "
                f"errors={sum(r.errors for r in roots)} "
                f"watch_errors={sum(r.watch_errors for r in roots)} "
                f"rebuilds={sum(r.rebuilds for r in roots)}")
        if st.jobs is not None:
            line += " jobs=" + ",".join(f"{k}:{v}" for k, v in sorted(st.jobs.items()))
        return line

    def log_status(self) -> None:
        for r in self.status(watches=False).roots:
            Subject(log, root=r.path).info(
                "status mode=%s scanned=%d fixed=%d skipped=%d errors=%d events=%d "
                "overflows=%d rebuilds=%d watch_errors=%d queue=%d full_passes=%d "
                "last_full_duration=%.3f", r.mode, r.scanned, r.fixed, sum(r.skipped.values()),
                r.errors, r.events, r.overflows, r.rebuilds, r.watch_errors, r.queue,
                r.full_passes, r.last_full_duration or 0.0)


def _start_jobs(config: Config) -> _Jobs:
    """The job manager (imported here: a heal-only daemon never loads the build side)."""
    from ..jobs.manager import JobManager

    jobs = JobManager(config)
    jobs.start()
    return jobs


def _start_server(config: Config, jobs: _Jobs | None, status: Any,
                  listen_sock: socket.socket | None) -> _Server:
    """The API server, always: even a heal-only daemon answers ``status`` (the probes use it);
    with requests disabled, job ops get a clear "requests are disabled" error."""
    from ..api.server import Server

    server = Server(config, jobs, status)  # type: ignore[arg-type]
    try:
        server.start(listen_sock)
    except BaseException:
        if jobs is not None:
            jobs.stop(5.0)
        raise
    return server
