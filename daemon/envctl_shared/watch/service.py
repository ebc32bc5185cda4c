"""One root, kept correct: its watch or poller, its work queue, its heal workers, its counters.

Order is the core correctness property. At start the watches are added (or the poll table is
recorded) *before* the startup reconcile, so anything written while the reconcile runs is either
seen by it or produces an event. At run time a created or moved-in directory is queued as a
subtree only once its watch (and those of the directories already in it) exists, so files
created in it before are found by the subtree pass, and files created after produce events.
Losses end in reconciles: a watch that cannot be added (``max_user_watches``) switches the root
to polling with one WARNING line, until the limit is raised (or, at a periodic full pass, the
root or this uid's other watchers need fewer): then inotify is tried again, and the root is back
to real time with one INFO line and a reconcile; an overflow, a table the watch cannot trust any
more, or an exception on its reader thread ends the watch, and the maintenance thread rebuilds it
(every directory watched again) and then reconciles the whole root. Nothing dies silently: every
exception is logged with its traceback and counted (``watch_errors``, ``rebuilds`` in status);
a watch that cannot be rebuilt after a few attempts, errors that keep coming back, or any
thread of this root ending on an exception make the root *failed* (``on_fatal``): the daemon
then reports not ready and exits non-zero, for systemd or Kubernetes to restart it.

Daemons on several hosts sharing a root poll it once between them: a :class:`PollGate` (the
daemon's election) says before every poll and periodic full pass whether this daemon is the one
to run it. The others keep their inotify watch, which is what heals their own host's writes in
real time, and their startup and overflow reconciles, which recover what that watch missed.

The watch's life is one explicit state (:class:`WatchState`), changed only along the edges of
``TRANSITIONS``: starting; watching (inotify); rebuilding (the watch ended, a new one is due);
starved (out of watches: polling instead, inotify retried); polling (configured so); failed. The
``mode`` in status is derived from it and from the poller (``+poll`` when this daemon polls,
``+standby`` when another daemon sharing the root does), never kept beside it.

Workers only call :class:`envctl_shared.heal.Healer`; entries come in batches of siblings, each one
costing one ``fstatat`` when already compliant, so the echo events of our own chgrp/chmod end
there with no write.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

from ..config import RootConfig, WatchConfig
from ..errors import FilesystemError
from ..fsinfo import mount_of
from ..heal import Finding, Healer, HealStats
from ..logfields import Subject, fields
from ..quoting import quote_name
from ..status import RootStatus
from .inotify import InotifyWatch, max_user_watches
from .poll import Poller
from .queue import ROOT, Item, WorkQueue

log = logging.getLogger(__name__)
ENTRY_DIRS = 64  # directories whose entries a worker heals in one call, at most
IDLE_TICK = 1.0  # workers wake at least this often, so their heartbeat shows they are alive
OVERFLOW_LOG_EVERY = 10.0  # at most one overflow WARNING per root per this many seconds
REBUILD_ATTEMPTS = 4  # consecutive failed rebuilds (1 s, 2 s, 4 s apart) before the root fails
ERROR_REBUILDS = (5, 600.0)  # this many rebuilds after errors within this many seconds: failed


class WatchState(Enum):
    """Where one root's watch is in its life (see ``TRANSITIONS`` for how it moves)."""

    STARTING = "starting"
    WATCHING = "watching"  # an inotify watch of every directory
    REBUILDING = "rebuilding"  # the watch ended (overflow, error): the maint thread rebuilds it
    STARVED = "starved"  # out of inotify watches: polled instead, inotify retried
    POLLING = "polling"  # configured to poll only (watch.mode: poll)
    FAILED = "failed"  # cannot be kept correct in real time any more: the daemon exits


_S = WatchState
TRANSITIONS: dict[WatchState, frozenset[WatchState]] = {
    _S.STARTING: frozenset({_S.WATCHING, _S.REBUILDING, _S.STARVED, _S.POLLING, _S.FAILED}),
    _S.WATCHING: frozenset({_S.REBUILDING, _S.STARVED, _S.FAILED}),
    _S.REBUILDING: frozenset({_S.WATCHING, _S.STARVED, _S.FAILED}),
    _S.STARVED: frozenset({_S.WATCHING, _S.FAILED}),
    _S.POLLING: frozenset({_S.FAILED}),
    _S.FAILED: frozenset(),
}
# The first word of the mode in status, for the states that have an inotify side.
_MODE_WORD = {_S.WATCHING: "inotify", _S.REBUILDING: "rebuilding"}


def mode_of(state: WatchState, polled: bool, leading: bool) -> str:
    """The ``mode`` status shows: the state's word, joined by ``+`` with the poller's part
    (``poll`` when this daemon polls, ``standby`` when another one does); ``starting`` and
    ``failed`` alone."""
    if state in (_S.STARTING, _S.FAILED):
        return state.value
    parts = [_MODE_WORD[state]] if state in _MODE_WORD else []
    if polled:
        parts.append("poll" if leading else "standby")
    return "+".join(parts)


@dataclass
class RootCounters:
    """Counters of one root since the daemon started watching it (``status`` reports them)."""

    events: int = 0
    overflows: int = 0
    rebuilds: int = 0  # the inotify watch rebuilt (after an overflow, a resync or an error)
    watch_errors: int = 0  # exceptions in the watch layer (reader, rebuilds, this root's threads)
    echoes: int = 0  # queued entries found already compliant (our own events, mostly)
    heals: HealStats = field(default_factory=HealStats)
    full_passes: int = 0
    dirs: int | None = None  # directories the last full pass found: one inotify watch each
    last_full_pass: float | None = None  # wall clock (time.time) of the last full reconcile end
    last_full_duration: float | None = None
    poll_passes: int = 0
    last_poll_duration: float | None = None


class PollGate(Protocol):
    """Who polls a root shared by several daemons (``envctl_shared.daemon.leader``)."""

    def may_poll(self) -> bool: ...
    def status(self, fresh: bool = True) -> dict[str, Any]: ...


class RootWatcher:
    """Watches and heals one root until stopped."""

    def __init__(self, root: RootConfig, watch: WatchConfig, concurrency: int,
                 wedge_after: float | None = None,
                 on_fatal: Callable[[str], None] | None = None,
                 gate: PollGate | None = None) -> None:
        """``on_fatal(reason)`` is called (once, from any thread) when this root can no longer
        be kept correct in real time and only a restart of the daemon can help. ``gate``: asked
        before every poll and periodic full pass (None: this daemon runs them all)."""
        self.root = root
        self._log = Subject(log, root=root.path)  # every line names its root once
        self._gate = gate
        self._leading = gate is None
        self._on_fatal = on_fatal
        self.failure: str | None = None
        self.watch_cfg = watch
        self.queue = WorkQueue()
        # Entry batches: serial, no thread start-up cost. Subtrees and reconciles: concurrent.
        per_fix = log.isEnabledFor(logging.DEBUG)  # each fix is logged only at DEBUG
        self._healer = Healer(root, on_finding=self._finding, report_fixes=per_fix)
        self._walker = Healer(root, concurrency=concurrency, on_finding=self._finding,
                              report_fixes=per_fix, on_progress=self._walk_progressed)
        self._walk_beat = time.monotonic()  # last directory any walk of this root visited
        self._status = RootCounters()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._state = WatchState.STARTING
        self._state_lock = threading.Lock()
        # Out of watches, said by the reader thread (or a watch being started): the maint
        # thread moves to STARVED. Starved: the limit then (inotify is retried when it changes,
        # and at full passes).
        self._degrade = threading.Event()
        self._starved_at: int | None = None
        # A poller for good (watch.mode poll, or auto on a network filesystem); else one exists
        # only while starved, and is dropped when inotify is back.
        self._polls_always = False
        self._inotify: InotifyWatch | None = None
        self._watch_lock = threading.Lock()  # swaps of ``_inotify`` (maint thread vs stop)
        self._poller: Poller | None = None
        self._threads: list[threading.Thread] = []
        self._beats: list[float] = []
        self._busy: list[bool] = []  # per thread: inside a heal or a poll pass
        self._wedge_after = wedge_after
        self._started = time.monotonic()
        self._last_overflow_log = 0.0
        self._rebuild_after_error = False  # why the state is REBUILDING: an exception
        self._rebuild_failures = 0
        self._next_rebuild = 0.0
        self._error_rebuilds: list[float] = []  # monotonic times of rebuilds after errors

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
        self._polls_always = mode == "poll" or (mode == "auto" and mount_of(path).remote)
        if self._polls_always:
            self._poller = Poller(self._walker)
        if self._degrade.is_set():
            self._fall_back_to_polling()
        elif mode == "poll":
            self._to(WatchState.POLLING)
        else:  # unless the watch already ended during its start (REBUILDING)
            self._to(WatchState.WATCHING, only_from=(WatchState.STARTING,))
        self._may_poll()
        self._reconcile()
        n = self.watch_cfg.workers
        self._beats = [time.monotonic()] * (n + 1)
        self._busy = [False] * (n + 1)
        for i in range(n):
            self._spawn(f"envctl-heal-{i}", self._work, i)
        self._spawn("envctl-maint", self._maintain, n)

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop noticing, finish what is queued (up to ``timeout``), stop the threads."""
        with self._watch_lock:
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

    def _spawn(self, name: str, target: Callable[[int], None], arg: int) -> None:
        t = threading.Thread(target=self._guarded, args=(target, arg), name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def _guarded(self, target: Callable[[int], None], arg: int) -> None:
        """A thread of this root: if it ever ends on an exception, that is logged, counted, and
        the root fails (a dead worker or maintenance thread would be a silent blind spot)."""
        try:
            target(arg)
        except BaseException as exc:
            self._status.watch_errors += 1
            name = threading.current_thread().name
            self._log.error("thread died thread=%s error=%s", name, _describe(exc),
                            exc_info=exc)
            self._fail(f"thread {name} died: {_describe(exc)}")

    def _to(self, new: WatchState, only_from: tuple[WatchState, ...] | None = None) -> bool:
        """Move to ``new`` along an edge of ``TRANSITIONS`` (another is a bug: RuntimeError);
        staying is no move. ``only_from``: move only from these states (a hook of another
        thread that may come late, e.g. the end of a watch that was replaced meanwhile).
        False when it did not move."""
        with self._state_lock:
            old = self._state
            if old is WatchState.FAILED or (only_from is not None and old not in only_from):
                return False  # failed is final: what other threads still do changes nothing
            if new is not old and new not in TRANSITIONS[old]:
                raise RuntimeError(f"root {self.root.path}: watch state {old.value} cannot "
                                   f"become {new.value}")
            self._state = new
        return True

    @property
    def state(self) -> WatchState:
        """Where this root's watch is now (status shows it as ``mode``)."""
        return self._state

    def _fail(self, reason: str) -> None:
        if self.failure is not None:
            return
        self.failure = reason
        self._to(WatchState.FAILED)
        self._log.error("root failed reason=%s action=exit", reason)
        if self._on_fatal is not None:
            self._on_fatal(reason)

    def _new_watch(self) -> InotifyWatch | None:
        """A started watch of the whole root, or None when not even the root gets a watch
        (``ENOSPC``); other OSErrors are raised."""
        watch = InotifyWatch(self.root.path, self.queue, self, self._count_events,
                             self._walk_progressed, self.root.exclude)
        try:
            watch.start()
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            return None
        return watch

    def _start_inotify(self) -> None:
        try:
            watch = self._new_watch()
        except OSError as exc:
            raise FilesystemError(f"cannot watch root {self.root.path}: {exc.strerror}",
                                  hint="check the path and inotify limits") from None
        if watch is None:
            self._degrade.set()
            return
        self._inotify = watch

    # -- hooks from the inotify reader thread --------------------------------------------------

    def _count_events(self, n: int) -> None:
        self._status.events += n

    def on_end(self, reason: str, exc: BaseException | None) -> None:
        """The watch ended by itself: the maintenance thread rebuilds it, then reconciles."""
        st = self._status
        if exc is not None:
            st.watch_errors += 1
            self._log.error("inotify watch failed error=%s action=rebuild", _describe(exc),
                            exc_info=exc)
        elif reason == "overflow":
            st.overflows += 1
            now = time.monotonic()
            if now - self._last_overflow_log >= OVERFLOW_LOG_EVERY:
                self._last_overflow_log = now
                self._log.warning("inotify queue overflow overflows=%d action=rebuild",
                                  st.overflows)
        else:
            self._log.warning("inotify watch ended reason=%s action=rebuild", reason)
        self._rebuild_after_error = exc is not None
        self._to(WatchState.REBUILDING, only_from=(WatchState.STARTING, WatchState.WATCHING))
        self._wake.set()

    def on_watch_failed(self, rel: str, err: int) -> None:
        """Out of inotify watches: polling takes over this root (done on the maint thread)."""
        self._degrade.set()
        self._wake.set()

    def _rebuild_watch(self) -> None:
        """A new watch (every directory watched again), then a reconcile of the whole root:
        whatever happened while no watch existed is found by it. A failure is retried a few
        times, then the root fails; so do errors that keep coming back after rebuilds."""
        with self._watch_lock:
            if not self._stop.is_set():
                self._replace_watch()

    def _replace_watch(self) -> None:
        if self._inotify is not None:
            self._inotify.stop()
            self._inotify = None
        try:
            self._start_inotify()
        except Exception as exc:
            self._status.watch_errors += 1
            self._rebuild_failures += 1
            self._log.error("inotify rebuild failed attempt=%d error=%s",
                            self._rebuild_failures, _describe(exc))
            if self._rebuild_failures >= REBUILD_ATTEMPTS:
                self._fail(f"inotify watch cannot be rebuilt: {_describe(exc)}")
            self._next_rebuild = time.monotonic() + 2.0 ** (self._rebuild_failures - 1)
            return
        now = time.monotonic()
        if self._inotify is not None:  # else not even the root got a watch: starved, next
            self._to(WatchState.WATCHING)
        self._rebuild_failures = 0
        self._status.rebuilds += 1
        self.queue.put(ROOT, subtree=True)
        self._log.info("inotify rebuilt rebuilds=%d watches=%d action=reconcile",
                       self._status.rebuilds,
                       self._inotify.watch_count() if self._inotify is not None else 0)
        if self._rebuild_after_error:
            limit, window = ERROR_REBUILDS
            self._error_rebuilds = [t for t in self._error_rebuilds if now - t < window] + [now]
            if len(self._error_rebuilds) >= limit:
                self._fail(f"inotify watch failed {limit} times within {window:.0f}s")

    def _fall_back_to_polling(self) -> None:
        watches = -1
        with self._watch_lock:
            if self._inotify is not None:
                watches = self._inotify.watch_count()
                self._inotify.stop()
                self._inotify = None
        if self._poller is None:
            self._poller = Poller(self._walker)
        self._to(WatchState.STARVED)
        self._starved_at = max_user_watches()
        self._log.warning("inotify watch limit reached watches=%d action=poll "
                          "poll_interval=%s hint=raise fs.inotify.max_user_watches", watches,
                          self.watch_cfg.poll_interval)
        self._degrade.clear()

    def _retry_inotify(self) -> None:
        """Polling for want of watches: try a whole new watch. Every directory watched →
        real time again (the poller dropped if it existed only for this), then a reconcile
        for what fell between the last poll and the watch; still short → the attempt's
        watches are released and polling goes on, without another WARNING."""
        self._starved_at = max_user_watches()
        try:
            watch = self._new_watch()
        except OSError as exc:
            self._log.warning("inotify retry failed error=%s", exc.strerror)
            return
        if watch is None:
            return
        if self._degrade.is_set():  # some directory got no watch: still short
            watch.stop()
            self._degrade.clear()
            self._log.debug("inotify retry short limit=%s", self._starved_at)
            return
        with self._watch_lock:
            if self._stop.is_set():
                watch.stop()
                return
            self._inotify = watch
        if not self._polls_always:
            self._poller = None
        self._starved_at = None
        self._to(WatchState.WATCHING)
        self.queue.put(ROOT, subtree=True)
        self._log.info("inotify restored watches=%d limit=%s action=reconcile",
                       watch.watch_count(), max_user_watches())

    # -- threads -------------------------------------------------------------------------------

    def _work(self, idx: int) -> None:
        while True:
            self._beats[idx] = time.monotonic()
            if (idx == 0 and self._wedge_after is not None
                    and time.monotonic() - self._started > self._wedge_after):
                self._log.warning("test hook ENVCTL_TEST_WEDGE_AFTER: worker wedged")
                threading.Event().wait()
            items = self.queue.get_many(IDLE_TICK, ENTRY_DIRS)
            if not items:
                if self.queue.closed:
                    return
                continue
            self._busy[idx] = True
            try:
                self._heal_guarded(items)
            finally:
                self._busy[idx] = False
                self.queue.done()

    def _heal_guarded(self, items: list[Item]) -> None:
        """``_heal``, where a bug must not kill the worker: it is logged and healing goes on.
        A batch that failed is healed again item by item, so that the bug costs only its own
        directory, not the up to ENTRY_DIRS - 1 others handed over with it (healing again
        what the batch already healed finds those entries compliant). The batch's own failure
        is logged too: a bug no single directory shows would go unsaid, while every batch
        cost ENTRY_DIRS + 1 heals."""
        try:
            self._heal(items)
        except Exception:
            if len(items) > 1:
                self._log.exception("heal failed dirs=%d again=one-by-one", len(items))
                for item in items:
                    self._heal_guarded([item])
                return
            rel = self.queue.path(items[0])
            self._log.exception("heal failed path=%s", quote_name(rel), extra=fields(path=rel))
            self._account(errors=1)

    def _walk_progressed(self) -> None:
        self._walk_beat = time.monotonic()

    def _heal(self, items: list[Item]) -> None:
        """A subtree, the root directory, or batches of entries of up to ENTRY_DIRS
        directories (paths built from the watch's nodes now, once per item)."""
        item = items[0]
        if item.names:
            # One fstatat per entry; an entry already compliant (mostly the echo of our own
            # chgrp/chmod) ends there, with no open and no write.
            # Each path built when its turn comes: in a deep chain one is ~0.5 MB.
            stats = self._healer.run_entries((self.queue.path(i), list(i.names))
                                             for i in items)
            entries = sum(len(i.names) for i in items)
            self._account(stats, echoes=max(0, entries - stats.violations))
            return
        rel = self.queue.path(item)
        if item.subtree and not rel:
            self._reconcile()
            return
        if item.subtree:
            stats = self._walker.run(rel, recursive=True)
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
            self._log.error("reconcile failed error=%s", exc.strerror)
            self._account(errors=1)
            return
        self._account(stats)
        st = self._status
        st.full_passes += 1
        st.dirs = stats.dirs
        st.last_full_pass = time.time()
        st.last_full_duration = stats.duration
        level = logging.INFO if stats.violations or stats.errors else logging.DEBUG
        self._log.log(level, "reconcile scanned=%d fixed=%d errors=%d duration=%.3f",
                      stats.scanned, stats.entries_fixed, stats.errors, stats.duration)

    def _finding(self, f: Finding) -> None:
        """Each entry fixed, skipped or failed, at DEBUG (with ENVCTL_PATH for the journal);
        compliant entries produce no finding, so this costs nothing on a correct tree."""
        if log.isEnabledFor(logging.DEBUG):
            self._log.debug("%s path=%s kind=%s problems=%s reason=%s", f.action,
                            quote_name(f.path), f.kind, ";".join(f.problems), f.reason or "",
                            extra=fields(path=f.path))

    def _account(self, stats: HealStats | None = None, echoes: int = 0,
                 errors: int = 0) -> None:
        """Add to the counters that several workers change at once, under the one lock: a
        ``+=`` of two threads can lose one of the additions."""
        with self._lock:
            if stats is not None:
                self._status.heals.merge(stats)
            self._status.echoes += echoes
            self._status.heals.errors += errors

    def _maintain(self, idx: int) -> None:
        """Polling, periodic reconciles and the fallback to polling, off the hot path."""
        now = time.monotonic()
        next_poll = now + self.watch_cfg.poll_interval
        next_full = now + self.watch_cfg.full_scan_interval
        while not self._stop.is_set():
            self._beats[idx] = now = time.monotonic()
            state = self._state
            if self._degrade.is_set():  # no watch to rebuild: polling replaces it
                self._fall_back_to_polling()
                self.queue.put(ROOT, subtree=True)  # reconcile what the lost watches missed
            elif state is WatchState.REBUILDING and now >= self._next_rebuild:
                self._busy[idx] = True  # a long rebuild shows progress through its walk
                try:
                    self._rebuild_watch()
                finally:
                    self._busy[idx] = False
            elif state is WatchState.STARVED and (now >= next_full
                                                  or max_user_watches() != self._starved_at):
                self._busy[idx] = True
                try:
                    self._retry_inotify()
                finally:
                    self._busy[idx] = False
            # The election runs at the polling cadence even without a poller: a follower
            # takes over within one poll_interval of the leader's lock being released.
            if (self._poller is not None or self._gate is not None) and now >= next_poll:
                if self._may_poll() and self._poller is not None:
                    self._busy[idx] = True
                    try:
                        self._poll()
                    finally:
                        self._busy[idx] = False
                next_poll = time.monotonic() + self.watch_cfg.poll_interval
            if now >= next_full:
                if self._may_poll():
                    self.queue.put(ROOT, subtree=True)
                next_full = now + self.watch_cfg.full_scan_interval
            polls = self._poller is not None or self._gate is not None
            wait = min(next_full, next_poll if polls else next_full,
                       self._next_rebuild if self._state is WatchState.REBUILDING else next_full)
            wait -= time.monotonic()
            self._wake.wait(max(0.0, min(wait, IDLE_TICK)))
            self._wake.clear()

    def _may_poll(self) -> bool:
        """Ask the election (right before a pass: a leader that lost its lock or its
        filesystem learns it here and does not start the pass)."""
        if self._gate is not None:
            self._leading = self._gate.may_poll()
        return self._leading

    def _poll(self) -> None:
        try:
            ps = self._poller.run()  # type: ignore[union-attr]
        except OSError as exc:
            self._log.error("poll failed error=%s", exc.strerror)
            return
        self._account(ps.heal)
        self._status.poll_passes += 1
        self._status.last_poll_duration = ps.duration
        if ps.heal.violations:
            self._log.debug("poll dirs=%d listed=%d fixed=%d duration=%.3f", ps.dirs,
                            ps.listed, ps.heal.entries_fixed, ps.duration)

    # -- what the daemon reads -----------------------------------------------------------------

    def heartbeat(self) -> float:
        """Monotonic time of the stalest thread's last sign of progress.

        A worker inside a long pass (a full reconcile of a big NFS root) shows progress through
        its walk, which reports every directory it visits: slow is alive, wedged is not."""
        if not self._beats:
            return time.monotonic()
        beats = [max(beat, self._walk_beat) if busy else beat
                 for beat, busy in zip(self._beats, self._busy)]
        watch = self._inotify
        if watch is not None:  # the reader beats every tick, and every directory it walks
            beats.append(watch.beat)
        return min(beats)

    def status(self, watches: bool = True) -> RootStatus:
        """This root's counters; ``watches=False`` skips counting the kernel's watches (it
        reads /proc, one line per watch: too costly for a 5 s STATUS= line) and reading the
        poller leader's record (round trips on the shared filesystem)."""
        st = self._status
        with self._lock:
            h = st.heals
            scanned, violations, errors = h.scanned, h.violations, h.errors
            fixed, fixed_by, skipped = h.entries_fixed, dict(h.fixed), dict(h.skipped)
        return RootStatus(
            path=str(self.root.path),
            mode=mode_of(self._state, self._poller is not None, self._leading),
            failure=self.failure, queue=len(self.queue),
            watches=(self._inotify.watch_count() if self._inotify else 0) if watches else None,
            watches_needed=0 if self.watch_cfg.mode == "poll" else st.dirs,
            scanned=scanned, violations=violations, fixed=fixed, fixed_by=fixed_by,
            skipped=skipped, errors=errors, events=st.events, echoes=st.echoes,
            overflows=st.overflows,
            rebuilds=st.rebuilds, watch_errors=st.watch_errors,
            poll_dirs=self._poller.directories if self._poller else 0,
            poll_passes=st.poll_passes, last_poll_duration=st.last_poll_duration,
            full_passes=st.full_passes, last_full_pass=st.last_full_pass,
            last_full_duration=st.last_full_duration,
            poller=self._gate.status(fresh=watches) if self._gate is not None else None)


def _describe(exc: BaseException) -> str:
    """One printable line naming an exception (its traceback goes to the log separately):
    its message may quote a name from the tree, which must not forge a log or status line."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in f"{type(exc).__name__}: {exc}")
