"""One root, kept correct: its watch or poller, its work queue, its heal workers, its counters.

Order is the core correctness property. At start the watches are added (or the poll table is
recorded) *before* the startup reconcile, so anything written while the reconcile runs is either
seen by it or produces an event. At run time a created or moved-in directory is queued as a
subtree only once watchdog has added its watch (watchdog adds it before it emits the event), so
files created in it before the watch existed are found by the subtree pass, and files created
after produce events. Losses end in reconciles: an overflow queues the whole root; a watch that
cannot be added (``max_user_watches``) switches the root to polling with one WARNING line.

Workers only call :class:`envctl_shared.heal.Healer`; entries come in batches of siblings, each one
costing one ``fstatat`` when already compliant, so the echo events of our own chgrp/chmod end
there with no write.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from ..config import RootConfig, WatchConfig
from ..errors import FilesystemError
from ..fsinfo import mount_of
from ..heal import Finding, Healer, HealStats
from ..logfields import fields
from .inotify import InotifyWatch
from .poll import Poller
from .queue import Item, WorkQueue

log = logging.getLogger("envctl.watch")
IDLE_TICK = 1.0  # workers wake at least this often, so their heartbeat shows they are alive
OVERFLOW_LOG_EVERY = 10.0  # at most one overflow WARNING per root per this many seconds


@dataclass
class RootStatus:
    """Counters of one root since the daemon started watching it."""

    mode: str = "starting"
    events: int = 0
    overflows: int = 0
    echoes: int = 0  # queued entries found already compliant (our own events, mostly)
    heals: HealStats = field(default_factory=HealStats)
    full_passes: int = 0
    last_full_pass: float | None = None  # wall clock (time.time) of the last full reconcile end
    last_full_duration: float | None = None
    poll_passes: int = 0
    last_poll_duration: float | None = None


class RootWatcher:
    """Watches and heals one root until stopped."""

    def __init__(self, root: RootConfig, watch: WatchConfig, concurrency: int,
                 wedge_after: float | None = None) -> None:
        self.root = root
        self.watch_cfg = watch
        self.queue = WorkQueue()
        # Entry batches: serial, no thread start-up cost. Subtrees and reconciles: concurrent.
        per_fix = log.isEnabledFor(logging.DEBUG)  # each fix is logged only at DEBUG
        self._healer = Healer(root, on_finding=self._finding, report_fixes=per_fix)
        self._walker = Healer(root, concurrency=concurrency, on_finding=self._finding,
                              report_fixes=per_fix, on_progress=self._walk_progressed)
        self._walk_beat = time.monotonic()  # last directory any walk of this root visited
        self._status = RootStatus()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._degrade = threading.Event()
        self._inotify: InotifyWatch | None = None
        self._poller: Poller | None = None
        self._threads: list[threading.Thread] = []
        self._beats: list[float] = []
        self._busy: list[bool] = []  # per thread: inside a heal or a poll pass
        self._wedge_after = wedge_after
        self._started = time.monotonic()
        self._last_overflow_log = 0.0

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Watch, reconcile the whole root, then start the workers. Returns when ready."""
        path = self.root.path
        if not path.is_dir() or path.is_symlink():
            raise FilesystemError(f"root {path} is not a directory",
                                  hint="create it or fix roots[].path in the config")
        mode = self.watch_cfg.mode
        if mode in ("auto", "inotify"):
            self._start_inotify()
        if mode == "poll" or (mode == "auto" and mount_of(path).remote):
            self._poller = Poller(self._walker)
        if self._degrade.is_set():
            self._fall_back_to_polling()
        self._update_mode()
        self._reconcile()
        n = self.watch_cfg.workers
        self._beats = [time.monotonic()] * (n + 1)
        self._busy = [False] * (n + 1)
        for i in range(n):
            self._spawn(f"envctl-heal-{i}", self._work, i)
        self._spawn("envctl-maint", self._maintain, n)

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop noticing, finish what is queued (up to ``timeout``), stop the threads."""
        self._stop.set()
        self._wake.set()
        if self._inotify is not None:
            self._inotify.stop()
            self._inotify = None
        drained = self.queue.wait_idle(timeout)
        self.queue.close()
        for t in self._threads:
            t.join(timeout=max(0.1, timeout))
        return drained

    def wait_idle(self, timeout: float) -> bool:
        """True once nothing is queued or being healed (tests and benchmarks)."""
        return self.queue.wait_idle(timeout)

    def _spawn(self, name: str, target: Any, arg: int) -> None:
        t = threading.Thread(target=target, args=(arg,), name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def _start_inotify(self) -> None:
        watch = InotifyWatch(self.root.path, self.queue, self, self._count_event)
        try:
            watch.start()
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise FilesystemError(f"cannot watch root {self.root.path}: {exc.strerror}",
                                      hint="check the path and inotify limits") from None
            self._degrade.set()
            return
        self._inotify = watch

    # -- hooks from the inotify reader thread --------------------------------------------------

    def _count_event(self) -> None:
        self._status.events += 1

    def on_overflow(self) -> None:
        """Events were lost: reconcile the whole root (after watchdog re-added its watches)."""
        self._status.overflows += 1
        self.queue.put("", subtree=True)
        now = time.monotonic()
        if now - self._last_overflow_log >= OVERFLOW_LOG_EVERY:
            self._last_overflow_log = now
            log.warning("inotify queue overflow root=%s overflows=%d action=reconcile",
                        self.root.path, self._status.overflows)

    def on_watch_failed(self, path: str, err: int) -> None:
        """Out of inotify watches: polling takes over this root (done on the maint thread)."""
        self._degrade.set()
        self._wake.set()

    def _fall_back_to_polling(self) -> None:
        watches = -1
        if self._inotify is not None:
            watches = self._inotify.watch_count()
            self._inotify.stop()
            self._inotify = None
        if self._poller is None:
            self._poller = Poller(self._walker)
        log.warning("inotify watch limit reached root=%s watches=%d action=poll "
                    "poll_interval=%s hint=raise fs.inotify.max_user_watches",
                    self.root.path, watches, self.watch_cfg.poll_interval)
        self._degrade.clear()

    def _update_mode(self) -> None:
        parts = (["inotify"] if self._inotify is not None else []) + \
            (["poll"] if self._poller is not None else [])
        self._status.mode = "+".join(parts)

    # -- threads -------------------------------------------------------------------------------

    def _work(self, idx: int) -> None:
        while True:
            self._beats[idx] = time.monotonic()
            if (idx == 0 and self._wedge_after is not None
                    and time.monotonic() - self._started > self._wedge_after):
                log.warning("test hook ENVCTL_TEST_WEDGE_AFTER: worker wedged root=%s",
                            self.root.path)
                threading.Event().wait()
            item = self.queue.get(IDLE_TICK)
            if item is None:
                if self.queue.closed:
                    return
                continue
            self._busy[idx] = True
            try:
                self._heal(item)
            except Exception:  # a bug must not kill the worker: log it, keep healing
                log.exception("heal failed root=%s path=%s", self.root.path, item.rel,
                              extra=fields(root=self.root.path, path=item.rel))
                self._status.heals.errors += 1
            finally:
                self._busy[idx] = False
                self.queue.done()

    def _walk_progressed(self) -> None:
        self._walk_beat = time.monotonic()

    def _heal(self, item: Item) -> None:
        if item.subtree and not item.rel:
            self._reconcile()
            return
        if item.subtree:
            stats = self._walker.run(item.rel, recursive=True)
        elif item.names:
            # One fstatat per entry; an entry already compliant (mostly the echo of our own
            # chgrp/chmod) ends there, with no open and no write.
            stats = self._healer.run_entries(item.rel, list(item.names))
            self._status.echoes += max(0, len(item.names) - stats.violations)
        else:
            stats = self._healer.run("", recursive=False)  # the root directory itself
        self._account(stats)

    def _reconcile(self) -> None:
        """A full pass over the root: at start, after an overflow, and periodically.

        With a poller, the pass goes through it, so that it also refreshes its table."""
        try:
            stats = (self._poller.run(full=True).heal if self._poller is not None
                     else self._walker.run("", recursive=True))
        except OSError as exc:
            log.error("reconcile failed root=%s error=%s", self.root.path, exc.strerror,
                      extra=fields(root=self.root.path))
            self._status.heals.errors += 1
            return
        self._account(stats)
        st = self._status
        st.full_passes += 1
        st.last_full_pass = time.time()
        st.last_full_duration = stats.duration
        level = logging.INFO if stats.violations or stats.errors else logging.DEBUG
        log.log(level, "reconcile root=%s scanned=%d fixed=%d errors=%d duration=%.3f",
                self.root.path, stats.scanned, stats.writes, stats.errors, stats.duration,
                extra=fields(root=self.root.path))

    def _finding(self, f: Finding) -> None:
        """Each entry fixed, skipped or failed, at DEBUG (with ENVCTL_PATH for the journal);
        compliant entries produce no finding, so this costs nothing on a correct tree."""
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s root=%s path=%s kind=%s problems=%s reason=%s", f.action,
                      self.root.path, f.path, f.kind, ";".join(f.problems), f.reason or "",
                      extra=fields(root=self.root.path, path=f.path))

    def _account(self, stats: HealStats) -> None:
        with self._lock:
            self._status.heals.merge(stats)

    def _maintain(self, idx: int) -> None:
        """Polling, periodic reconciles and the fallback to polling, off the hot path."""
        now = time.monotonic()
        next_poll = now + self.watch_cfg.poll_interval
        next_full = now + self.watch_cfg.full_scan_interval
        while not self._stop.is_set():
            self._beats[idx] = now = time.monotonic()
            if self._degrade.is_set():
                self._fall_back_to_polling()
                self.queue.put("", subtree=True)  # reconcile what the lost watches missed
                self._update_mode()
            if self._poller is not None and now >= next_poll:
                self._busy[idx] = True
                try:
                    self._poll()
                finally:
                    self._busy[idx] = False
                next_poll = time.monotonic() + self.watch_cfg.poll_interval
            if now >= next_full:
                self.queue.put("", subtree=True)
                next_full = now + self.watch_cfg.full_scan_interval
            wait = min(next_full, next_poll if self._poller else next_full) - time.monotonic()
            self._wake.wait(max(0.0, min(wait, IDLE_TICK)))
            self._wake.clear()

    def _poll(self) -> None:
        try:
            ps = self._poller.run()  # type: ignore[union-attr]
        except OSError as exc:
            log.error("poll failed root=%s error=%s", self.root.path, exc.strerror)
            return
        self._account(ps.heal)
        self._status.poll_passes += 1
        self._status.last_poll_duration = ps.duration
        if ps.heal.violations:
            log.debug("poll root=%s dirs=%d listed=%d fixed=%d duration=%.3f",
                      self.root.path, ps.dirs, ps.listed, ps.heal.writes, ps.duration)

    # -- what the daemon reads -----------------------------------------------------------------

    def heartbeat(self) -> float:
        """Monotonic time of the stalest thread's last sign of progress.

        A worker inside a long pass (a full reconcile of a big NFS root) shows progress through
        its walk, which reports every directory it visits: slow is alive, wedged is not."""
        if not self._beats:
            return time.monotonic()
        return min(max(beat, self._walk_beat) if busy else beat
                   for beat, busy in zip(self._beats, self._busy))

    def status(self, watches: bool = True) -> dict[str, Any]:
        """JSON-ready counters of this root; ``watches=False`` skips counting the kernel's
        watches (it reads /proc, one line per watch: too costly for a 5 s STATUS= line)."""
        st = self._status
        with self._lock:
            h = st.heals
            heals: dict[str, Any] = {"scanned": h.scanned, "violations": h.violations,
                                     "fixed": h.writes, "fixed_by": dict(h.fixed),
                                     "skipped": dict(h.skipped), "errors": h.errors}
        return {
            "path": str(self.root.path),
            "mode": st.mode,
            **heals,
            "events": st.events,
            "echoes": st.echoes,
            "overflows": st.overflows,
            "queue": len(self.queue),
            "watches": (self._inotify.watch_count() if self._inotify else 0) if watches else None,
            "poll_dirs": self._poller.directories if self._poller else 0,
            "full_passes": st.full_passes,
            "last_full_pass": st.last_full_pass,
            "last_full_duration": st.last_full_duration,
            "poll_passes": st.poll_passes,
            "last_poll_duration": st.last_poll_duration,
        }

