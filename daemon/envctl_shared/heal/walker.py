"""The one walker behind every pass: fd-based, no-follow, concurrent, zero writes when correct.

Used by ``envctl heal``/``check``, the daemon's startup and periodic reconciles, its subtree
reconciles of new directories and its per-event heals. Safety rules, all enforced here:

- Directories are opened relative to their parent's fd with ``O_NOFOLLOW|O_DIRECTORY``; an entry
  is changed only through an fd opened ``O_PATH|O_NOFOLLOW`` and ``fstat``-ed, so what is judged
  is exactly the inode that is changed. A symlink or rename swapped in mid-walk can at worst
  make us chgrp the link itself.
- What may be changed is the root's :class:`~envctl_shared.policy.Rules`, executed by the C
  engine (``fsops.Engine``): its walks and scans, and this module's slow path for a single
  entry (``Engine.judge``), ask the same C ``classify`` — nothing on another mount, no special
  file, no protected or (``owners: members``) foreign owner is changed, in that one order.
  Excluded patterns are neither changed nor descended into.
- A compliant entry costs one ``statx`` and no open, no write. After an entry fixed in the
  same directory (a broken tree: nearly all are), C opens the next one ``O_PATH`` first and
  judges it by that fd: one call less per wrong entry, an open and close more per right one.
- Any depth: no recursion (C or Python), a bounded number of open fds, and each entry costs
  the same at level 20,000 as at level 2 (paths are built only for what is reported; a path
  from an event is resolved by the kernel in one ``openat2``).

Speed: the per-entry loop — list, inspect, fix, or report as skipped (special files, protected
owners, other mounts) — runs in C (``Engine.scan``) with the GIL released, judged by the
root's ``Rules``; Python handles directories and what changed under the fast path (an
entry swapped mid-fix). A serial walk with no exclusions and no planner (``heal``/``check``
and reconciles on a local disk) hands whole subtrees to C (``Engine.walk``), which takes
directories too; Python then revisits by path only what was swapped or moved mid-walk.
Entries fixed are only counted in C unless a finding is wanted for each (``heal -v``, a
check's listener): a tuple per entry cost ~8% of the CPU of a broken 60k-entry heal.

Concurrency: on NFS/EFS each call is a network round trip, so directories are listed and their
entries inspected and fixed by a bounded pool of threads, in batches of ``BATCH`` names, each
batch shared by ``LANES`` C threads (GIL-free): a pool of N keeps up to N x LANES lookups in
flight. One lookup per thread left the pool idle ~10% of each call (wake-ups on a shared CPU)
and capped a 60k-entry check through 1 ms FUSE at ~15x a serial ``find``.
Tasks sit on a LIFO stack (depth first), and when the stack is long, batches run inline instead
of being queued, which bounds memory on very wide trees. A queued task pins its directory but
not its fd (``_Fds``). With concurrency 1 everything runs in the caller's thread and the C loop
lists each directory itself.

Why the concurrent walk's fd table (``_Fds``) is Python and not the C walk: the C engine has
one walk (``tree_walk``, with its heal/check, stamp-check and list visit modes), a
single-threaded depth-first stack whose open levels are exactly its path. A concurrent pass has
no such path: directories are held by tasks queued on a LIFO stack and run by a pool of Python
threads, with the planner (the poller's stamps, excludes, per-directory listeners) deciding
between them; which fds may close depends on which tasks are still queued on which thread.
That is the orchestration the issue leaves to Python, and moving ``_Fds`` alone would mean
moving the task stack and the pool with it. It costs one lock and dict step per directory,
not per entry (entries are inspected in C with the GIL released, in lanes), and proves a
reopened directory the same way the C walk does: by inode, device and mount, reached through
its child's ``..`` or resolved by the kernel from the root (``open_dir``: no symlink, no mount
crossing).
"""

from __future__ import annotations

import errno
import fnmatch
import os
import re
import stat
import threading
import time
import weakref
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import NamedTuple, Protocol

from ..config import RootConfig
from ..policy import Kind, Rules, Verdict, kind_of
from .fsops import (
    DIR_FLAGS,
    PATH_DIR_FLAGS,
    PATH_FLAGS,
    Engine,
    Fixed,
    Judged,
    MountRef,
    NodePaths,
    ScanResult,
    Skipped,
    Stamp,
    Stat,
    Tallied,
    ident,
    open_dir,
    reopen,
    stat_at,
)
from .stats import Finding, FindingSink, HealStats

BATCH = 32  # entries inspected per task when concurrent
LANES = 2  # C threads sharing a concurrent task's batch: lookups in flight per walk thread
MAX_QUEUED = 4096  # beyond this many queued tasks, listers inspect their entries inline


FD_BUDGET = 128  # directory fds a pass keeps open for queued tasks (beyond those in use)


class _DirRef:
    """A directory shared by the tasks that still need it (``acquire``/``release``; the last
    one closes it), and used by one or more of them right now (``use``/``unuse``).

    Its fd may be closed while only queued tasks hold it (see ``_Fds``) and reopened when one
    runs, proven to be the same directory (inode, device, mount)."""

    __slots__ = ("fd", "rel", "ident", "refs", "users", "child_seen", "_fds", "__weakref__")

    def __init__(self, fds: _Fds, fd: int, rel: str, st: Stat) -> None:
        self._fds = fds
        self.fd = fd
        self.rel = rel
        self.ident = ident(st)
        self.refs = 1
        self.users = 1  # its creator uses it: call unuse() when done
        # The last subdirectory opened (".." leads back here), weakly: a strong link would keep
        # every level of a deep chain, and its path, alive for the whole pass.
        self.child_seen: weakref.ref[_DirRef] | None = None

    def acquire(self) -> _DirRef:
        with self._fds.lock:
            self.refs += 1
        return self

    def release(self) -> None:
        self._fds.release(self)

    def use(self) -> bool:
        """Make sure the fd is open for the caller (call ``unuse`` after, whatever the result);
        False when it had been closed and the directory is no longer where it was."""
        return self._fds.use(self)

    def unuse(self) -> None:
        self._fds.unuse(self)

    def child(self, name: str) -> str:
        return f"{self.rel}/{name}" if self.rel else name


class _Fds:
    """The directory fds of one pass, bounded whatever the shape of the tree.

    A queued task keeps its directory referenced, and depth-first order leaves a task queued
    at every level of a deep tree whose directories have several subdirectories: 20,000
    levels would hold 20,000 fds (EMFILE long before). Directories that no running task uses
    are closed beyond ``FD_BUDGET``, least recently used first, and reopened when a task needs
    them: through the ".." of their last subdirectory when that one is still open (the way
    back up a deep tree: one call), else from the root by the kernel (``open_dir``: no
    symlink, no mount, never outside); either way proven to be the same directory.
    """

    def __init__(self, root_fd: int) -> None:
        self.lock = threading.Lock()
        self.root_fd = root_fd
        self._idle: OrderedDict[_DirRef, None] = OrderedDict()  # open, not in use, LRU first

    def new(self, fd: int, rel: str, st: Stat, parent: _DirRef | None = None) -> _DirRef:
        """A directory just opened by the caller (in ``parent``), who uses it until ``unuse``."""
        ref = _DirRef(self, fd, rel, st)
        if parent is not None:
            parent.child_seen = weakref.ref(ref)
        return ref

    def use(self, ref: _DirRef) -> bool:
        with self.lock:
            ref.users += 1
            self._idle.pop(ref, None)
            if ref.fd >= 0:
                return True
            child = ref.child_seen() if ref.child_seen is not None else None
            if child is not None and child.fd >= 0:
                ref.fd = reopen(lambda: os.open("..", PATH_DIR_FLAGS, dir_fd=child.fd),
                                ref.ident)
            if ref.fd < 0:
                ref.fd = reopen(lambda: open_dir(self.root_fd, ref.rel), ref.ident)
            return ref.fd >= 0

    def unuse(self, ref: _DirRef) -> None:
        with self.lock:
            ref.users -= 1
            self._park(ref)

    def release(self, ref: _DirRef) -> None:
        with self.lock:
            ref.refs -= 1
            self._park(ref)

    def _park(self, ref: _DirRef) -> None:
        """An fd nobody uses right now stays open among the most recent FD_BUDGET, needed by
        queued tasks or not: a released directory's ".." is how its parent is reopened."""
        if ref.users or ref.fd < 0:
            return
        if not ref.refs:
            ref.rel = ""  # no task will reopen it: its path (long in a deep tree) can go
        self._idle[ref] = None
        self._idle.move_to_end(ref)
        while len(self._idle) > FD_BUDGET:
            old, _ = self._idle.popitem(last=False)
            os.close(old.fd)
            old.fd = -1

    def close_all(self) -> None:
        """At the end of the pass."""
        with self.lock:
            for ref in self._idle:
                os.close(ref.fd)
                ref.fd = -1
            self._idle.clear()


class _Listing:
    """A directory listed in several concurrent batches: tells the planner its subdirectories
    once the last batch has inspected its share."""

    __slots__ = ("rel", "st", "subdirs", "_left", "_lock", "_planner")

    def __init__(self, planner: DirPlanner, rel: str, st: Stat, batches: int) -> None:
        self._planner, self.rel, self.st = planner, rel, st
        self.subdirs: list[str] = []
        self._left = batches
        self._lock = threading.Lock()

    def done(self, subdirs: list[str]) -> None:
        with self._lock:
            self.subdirs.extend(subdirs)
            self._left -= 1
            last = self._left == 0
        if last:
            self._planner.listed(self.rel, self.st, self.subdirs)


class _DirTask(NamedTuple):
    parent: _DirRef | None  # None: the root itself
    name: str
    rel: str
    descend: bool = True


class _EntriesTask(NamedTuple):
    parent: _DirRef
    names: list[str]
    descend: bool = True  # for an entry that turns out to be a directory
    listing: _Listing | None = None


_Task = _DirTask | _EntriesTask


def compile_excludes(patterns: tuple[str, ...]) -> Callable[[str], bool]:
    """A predicate on root-relative paths; ``*`` matches across ``/`` like fnmatch."""
    if not patterns:
        return lambda rel: False
    rx = re.compile("|".join(f"(?:{fnmatch.translate(p.rstrip('/'))})" for p in patterns))
    return lambda rel: bool(rx.match(rel))


def excludes_below(patterns: tuple[str, ...], at_root: bool) -> bool:
    """Whether ``patterns`` may exclude an entry of a directory (``at_root``: of the root
    itself). Plain names (no ``/``, no wildcard: like the requests root's built-in ``.envctl``)
    only ever match entries of the root, so every directory below keeps the C fast path and
    the watcher checks nothing there."""
    return bool(patterns) and (at_root or any(c in p for p in patterns for c in "/*?["))


def _child(parent: str, _node: int, name: str) -> str:
    """The path of entry ``name`` of ``parent`` (a finding's, from a scan's record)."""
    return f"{parent}/{name}"


def _clean(rel: str, names: Sequence[str]) -> bool:
    """Whether ``rel`` ("" : the root) is a clean relative path and ``names`` plain names."""
    parts = rel.split("/") if rel else []
    return not any(p in ("", ".", "..") for p in (*parts, *names)) and \
        not any("/" in n for n in names)


class DirPlanner(Protocol):
    """Lets a caller skip listing directories it knows to be unchanged (the poll pass).

    ``plan`` is asked for every directory the walk opens, with its fresh ``fstat`` (after any
    fix to the directory itself): return the names of its subdirectories to descend into
    without listing it — its other entries are then not inspected — or None to list it.
    ``listed`` reports what a listing found, with the stat taken before it, so a change made
    during the listing shows up as a change next time. Both are called from worker threads.
    """

    def plan(self, rel: str, st: Stat) -> Sequence[str] | None: ...

    def listed(self, rel: str, st: Stat, subdirs: list[str]) -> None: ...


class Healer:
    """Heals (or, with ``dry_run``, only inspects) one root according to its policy."""

    def __init__(self, root: RootConfig, *, dry_run: bool = False, concurrency: int = 1,
                 on_finding: FindingSink | None = None, report_fixes: bool = True,
                 on_progress: Callable[[], None] | None = None) -> None:
        """``on_finding`` hears of every entry found wrong, skipped or failed; with
        ``report_fixes`` False, not of each entry fixed (a 60k-entry heal would otherwise build
        60k findings nobody reads). ``on_progress`` is called (from any walk thread) for every
        directory visited: the daemon's liveness signal during long passes, so a watchdog tells
        slow from wedged."""
        self.root = root
        self.on_progress = on_progress
        self.dry_run = dry_run
        self.concurrency = max(1, concurrency)
        self._on_finding = on_finding
        self.report_fixes = report_fixes and on_finding is not None
        self._report_lock = threading.Lock()
        self.rules = Rules.of(root)
        self.engine = Engine(self.rules)
        self.excluded = compile_excludes(self.rules.exclude)
        self._current: _Pass | None = None  # the latest pass started (see ``progress``)
        self._verdicts: dict[tuple[int, int, bool], Verdict] = {}

    def verdict(self, st_mode: int, st_gid: int, is_root: bool = False) -> Verdict:
        """``Rules.verdict`` memoised (what a finding reports as wanted): a tree has few
        distinct (mode, group) pairs."""
        key = (st_mode, st_gid, is_root)
        found = self._verdicts.get(key)
        if found is None:
            found = self.rules.verdict(st_mode, st_gid, is_root)
            if len(self._verdicts) < 4096:
                self._verdicts[key] = found
        return found

    # -- public API -----------------------------------------------------------------------

    def run(self, rel: str = "", recursive: bool = True,
            planner: DirPlanner | None = None) -> HealStats:
        """Heal the entry at root-relative ``rel`` ("" = the root), and its subtree if asked.

        ``rel`` is re-resolved component by component from the root fd without following
        symlinks: a path that came from an event is a hint, never trusted.
        """
        return _Pass(self, planner).run(rel, recursive)

    def progress(self) -> tuple[int, int, int, int]:
        """(scanned, violations, fixed, errors) of the latest pass so far, read from another
        thread without stopping the walk (a progress display: plain int reads, no lock; a
        count can lag by the batch a worker is adding)."""
        current = self._current
        if current is None:
            return (0, 0, 0, 0)
        out = [0, 0, 0, 0]
        for st in list(current.live):
            fixed = st.fixed
            out[0] += st.scanned
            out[1] += st.violations
            out[2] += fixed["group"] + fixed["mode"]
            out[3] += st.errors
        return (out[0], out[1], out[2], out[3])

    def stale_dirs(self, stamps: dict[int, Stamp]) -> tuple[int, list[str]]:
        """The directories of ``stamps`` (see ``Engine.check_stamps``) that a serial poll pass
        must visit: unknown, changed since stamped, wrong, or on another mount. Returns how
        many directories were checked, and those paths."""
        fd = os.open(self.root.path, DIR_FLAGS)
        try:
            return self.engine.check_stamps(fd, stamps, MountRef.of(stat_at(fd)))
        finally:
            os.close(fd)

    def run_entries(self, groups: Iterable[tuple[str, list[str]]]) -> HealStats:
        """Heal, for each ``(parent, names)`` of ``groups``, entries ``names`` of the directory
        ``parent`` (not their subtrees), resolving ``parent`` once: the daemon's batches of
        event paths cost what a walk pays per entry.

        The usual group (a directory below the root, no pattern that may exclude there, one
        thread) is one C scan, without a pass's machinery (~65 µs a batch, and a burst of 60k
        entries makes ~20k batches); directories among ``names`` are judged there like files
        (the entry, not its subtree: a pass per directory named cost more than the rest of the
        batch). The root is opened, and C's tallies counted, once for all groups (a burst's
        directories hold a few entries each). Only what a scan hands back (entries changed
        under it or failed) goes through a full pass, as do the other groups."""
        start = time.monotonic()
        stats = HealStats()
        tallied: Tallied = []
        serial = self.concurrency == 1 and not excludes_below(self.rules.exclude, False)
        root_fd = os.open(self.root.path, DIR_FLAGS)
        try:
            mount = MountRef.of(stat_at(root_fd))
            for parent, names in groups:
                again = names
                if (serial and parent and not self.excluded(parent.partition("/")[0])
                        and _clean(parent, names)):
                    found = self._scan_entries(root_fd, mount, parent, names)
                    if found is not None:
                        stats.scanned += found.scanned
                        tallied += found.tallied
                        if found.fixed or found.skipped:
                            self.count_c(found.fixed, found.skipped, [],
                                         partial(_child, parent), stats)
                        again = [a[1] for a in found.attention]
                if again:
                    stats.merge(_Pass(self).run(parent, False, again))
        finally:
            os.close(root_fd)
        self.count_c([], [], tallied, lambda _node, name: name, stats)
        stats.duration = time.monotonic() - start
        return stats

    def _scan_entries(self, root_fd: int, mount: MountRef, parent: str,
                      names: list[str]) -> ScanResult | None:
        """``names`` of ``parent`` (resolved from the root) through one C scan; None when
        ``parent`` cannot be opened (gone, another mount, a symlink: a full pass says which)."""
        try:
            fd = open_dir(root_fd, parent)
        except OSError:
            return None
        try:
            return self.engine.scan(fd, names, mount, fix=not self.dry_run,
                                    tally=not self.c_reporting, dirs=True)
        finally:
            os.close(fd)

    # -- reporting (called from worker threads) ------------------------------------------

    @property
    def c_reporting(self) -> bool:
        """Whether each entry C fixes (or with fix off, finds wrong) becomes a finding; when
        not, C only tallies them."""
        return self.reporting if self.dry_run else self.report_fixes

    def count_c(self, fixed: Fixed, skipped: Skipped, tallied: Tallied,
                 path: Callable[[int, str], str], stats: HealStats) -> None:
        """Account for what C fixed (or with fix off, found wrong: listed in ``fixed``, or
        counted in ``tallied``) and skipped, as ``_judge_and_fix`` and ``_skip`` do for the
        slow path; ``path`` names an entry (built only for a finding someone listens to). C
        counted every one of them as scanned."""
        stats.violations += len(fixed)
        groups = modes = 0
        kinds: Counter[int] = Counter()
        for fmt, entries, set_gids, set_modes, changed in tallied:
            stats.violations += entries
            groups += set_gids
            modes += set_modes
            if changed:
                kinds[fmt] += changed
        reporting = self.c_reporting
        action = "would-fix" if self.dry_run else "fixed"
        for node, name, mode, gid, set_gid, set_mode in fixed:
            groups += set_gid
            modes += set_mode >= 0
            if set_gid or set_mode >= 0:
                kinds[stat.S_IFMT(mode)] += 1
            if reporting:
                problems = tuple(self.verdict(mode, gid).problems(gid, mode))
                self.report(Finding(path(node, name), kind_of(mode).value, action, problems))
        stats.fixed["group"] += groups
        stats.fixed["mode"] += modes
        for fmt, n in kinds.items():
            stats.fixed_kinds[kind_of(fmt).value] += n
        for node, name, reason, mode, _uid, gid in skipped:
            stats.skipped[reason] += 1
            if self.reporting:
                verdict = self.verdict(mode, gid)
                problems = tuple(verdict.problems(gid, mode)) if reason == "protected" else ()
                self.report(Finding(path(node, name), verdict.kind.value, "skipped", problems,
                                    reason))

    @property
    def reporting(self) -> bool:
        """Whether anyone listens for findings (building them costs string formatting)."""
        return self._on_finding is not None

    def report(self, finding: Finding) -> None:
        if self._on_finding is not None:
            with self._report_lock:
                self._on_finding(finding)


class _Pass:
    """One walk: the root fd, the task stack and the worker threads."""

    def __init__(self, healer: Healer, planner: DirPlanner | None = None) -> None:
        self.h = healer
        self.planner = planner
        self.root = healer.root
        self.stack: list[_Task] = []
        self.cond = threading.Condition()
        self.pending = 0
        self.mount = MountRef(-1, -1)  # the root's, once opened
        self.root_ref: _DirRef | None = None  # open for the whole pass (paths from C walks)
        self.fds: _Fds | None = None
        self.totals = HealStats()
        self.live: list[HealStats] = []  # every counter of the pass, for Healer.progress

    # -- driving ---------------------------------------------------------------------------

    def run(self, rel: str, recursive: bool, names: list[str] | None = None) -> HealStats:
        start = time.monotonic()
        stats = HealStats()
        self.live.append(stats)
        self.h._current = self
        root_fd = os.open(self.root.path, DIR_FLAGS)
        try:
            st = stat_at(root_fd)
        except OSError:
            os.close(root_fd)
            raise
        self.fds = _Fds(root_fd)
        root_ref = self.root_ref = self.fds.new(root_fd, "", st)  # in use: never closed early
        try:
            self.mount = MountRef.of(st)
            first = self._resolve(root_ref, rel, recursive, stats, names)
            if first is not None:
                self._push(first)
                if self.h.concurrency == 1:
                    self._drain_inline(stats)
                else:
                    self._drain_threads()
        finally:
            root_ref.unuse()
            root_ref.release()
            self.fds.close_all()  # the root's fd among them
        self.totals.merge(stats)
        self.totals.duration = time.monotonic() - start
        return self.totals

    def _resolve(self, root_ref: _DirRef, rel: str, recursive: bool, stats: HealStats,
                 names: list[str] | None = None) -> _Task | None:
        """Open the parent of ``rel`` from the root (no symlink, no mount crossed: ``open_dir``);
        the last part becomes a task (with ``names``, ``rel`` is their directory: it is opened,
        and they are the task)."""
        if not rel and names is None:
            return _DirTask(None, "", "", recursive)
        parts = rel.split("/") if rel else []
        if not _clean(rel, names or ()):
            raise ValueError(f"not a clean relative path: {rel!r} {names!r}")
        parent_rel = rel if names is not None else rel.rpartition("/")[0]
        if self.root.exclude:  # every prefix, as a slice of rel (joins would cost depth²)
            end = -1
            for part in parent_rel.split("/") if parent_rel else ():
                end += len(part) + 1
                if self.h.excluded(parent_rel[:end]):
                    stats.skipped["excluded"] += 1
                    return None
        if not parent_rel:
            parent = root_ref.acquire()
        else:
            assert self.fds is not None
            try:
                fd = open_dir(root_ref.fd, parent_rel)
            except OSError as exc:
                if exc.errno == errno.EXDEV:
                    stats.skipped["mount"] += 1
                elif exc.errno in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR):
                    stats.skipped["vanished"] += 1
                else:
                    self._error(stats, parent_rel, "dir", exc)
                return None
            try:
                st = stat_at(fd)
            except OSError as exc:
                os.close(fd)
                self._error(stats, parent_rel, "dir", exc)
                return None
            parent = self.fds.new(fd, parent_rel, st)
            parent.unuse()  # its tasks use it when they run
        try:
            if names is not None:
                keep = [n for n in names if not self.h.excluded(parent.child(n))]
                stats.skipped["excluded"] += len(names) - len(keep)
                return _EntriesTask(parent.acquire(), keep, False) if keep else None
            if self.h.excluded(rel):
                stats.skipped["excluded"] += 1
                return None
            return _EntriesTask(parent.acquire(), [parts[-1]], recursive)
        finally:
            parent.release()

    def _push(self, task: _Task) -> None:
        with self.cond:
            self.stack.append(task)
            self.pending += 1
            self.cond.notify()

    def _drain_inline(self, stats: HealStats) -> None:
        while self.stack:
            task = self.stack.pop()
            self.pending -= 1
            self._do(task, stats)

    def _drain_threads(self) -> None:
        workers = [threading.Thread(target=self._worker, name=f"envctl-walk-{i}", daemon=True)
                   for i in range(self.h.concurrency)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()

    def _worker(self) -> None:
        stats = HealStats()
        with self.cond:
            self.live.append(stats)
        while True:
            with self.cond:
                while not self.stack and self.pending:
                    self.cond.wait()
                if not self.stack:
                    break
                task = self.stack.pop()
            try:
                self._do(task, stats)
            finally:
                with self.cond:
                    self.pending -= 1
                    if not self.pending:
                        self.cond.notify_all()
        with self.cond:
            self.totals.merge(stats)

    def _do(self, task: _Task, stats: HealStats) -> None:
        parent = task.parent
        try:
            if parent is not None and not parent.use():  # closed, then moved away or gone
                stats.skipped["vanished"] += 1 if isinstance(task, _DirTask) else len(task.names)
                if isinstance(task, _EntriesTask) and task.listing is not None:
                    task.listing.done([])
            elif isinstance(task, _DirTask):
                self._visit_dir(task, stats)
            else:
                subdirs = self._scan(task.parent, task.names, stats, task.descend)
                if task.listing is not None:
                    task.listing.done(subdirs)
        finally:
            if parent is not None:
                parent.unuse()
                parent.release()

    # -- the work ----------------------------------------------------------------------------

    def _visit_dir(self, task: _DirTask, stats: HealStats) -> None:
        rel = task.rel
        # With a planner most directories are unchanged and need no listing: open them O_PATH
        # (enough to stat, fix and reach the children), and for reading only to list them.
        path_only = self.planner is not None and task.parent is not None
        try:
            if task.parent is None:
                fd = os.open(self.root.path, DIR_FLAGS)
            else:
                fd = os.open(task.name, PATH_DIR_FLAGS if path_only else DIR_FLAGS,
                             dir_fd=task.parent.fd)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR) and task.parent is not None:
                # Swapped for a symlink or a file since it was listed: judge it as an entry.
                self._inspect(task.parent, task.name, stats)
            elif exc.errno == errno.ENOENT:
                stats.skipped["vanished"] += 1
            else:
                self._error(stats, rel, "dir", exc)
            return
        if self.h.on_progress is not None:
            self.h.on_progress()
        try:
            st = stat_at(fd)
        except OSError as exc:
            os.close(fd)
            self._error(stats, rel, "dir", exc)
            return
        assert self.fds is not None
        ref = self.fds.new(fd, rel, st, task.parent)
        try:
            stats.scanned += 1
            stats.dirs += 1
            judged = self._judge_and_fix(fd, rel, stats, task.parent is None)
            if judged.outcome == "mount":
                return
            if judged.set_gid or judged.set_mode >= 0:
                st = stat_at(fd)
            if not task.descend:
                return
            known = self.planner.plan(rel, st) if self.planner is not None else None
            if known is None and path_only:
                listing = self.fds.new(os.open(".", DIR_FLAGS, dir_fd=fd), rel, st)
                try:
                    self._list(listing, st, stats)
                finally:
                    listing.unuse()
                    listing.release()
            elif known is None:
                self._list(ref, st, stats)
            else:
                for name in known:
                    self._push(_DirTask(ref.acquire(), name, ref.child(name)))
        except OSError as exc:
            self._error(stats, rel, "dir", exc)
        finally:
            ref.unuse()
            ref.release()

    def _list(self, ref: _DirRef, st: Stat, stats: HealStats) -> None:
        """List a directory: subdirectories become tasks, other entries are inspected.

        Serially, with no exclusion patterns, C does it: the whole subtree in one call
        (``_walk_below``), or with a planner, which must hear of every directory listed, this
        directory in one call. Otherwise the names are listed here (no stat: on FUSE/NFS a
        listing may lack types), excluded ones dropped, and the rest inspected in batches by
        whichever worker is free.
        """
        concurrent = self.h.concurrency > 1
        filtered = excludes_below(self.root.exclude, not ref.rel)
        if not concurrent and not filtered:
            if self.planner is None:
                self._walk_below(ref, stats)
            else:
                self.planner.listed(ref.rel, st, self._scan(ref, None, stats))
            return
        names = os.listdir(ref.fd)
        if filtered:
            keep = [n for n in names if not self.h.excluded(ref.child(n))]
            stats.skipped["excluded"] += len(names) - len(keep)
            names = keep
        step = BATCH if concurrent and len(self.stack) < MAX_QUEUED else max(1, len(names))
        batches = [names[i:i + step] for i in range(0, len(names), step)]
        listing = (_Listing(self.planner, ref.rel, st, len(batches))
                   if self.planner is not None else None)
        if not batches and listing is not None:
            self.planner.listed(ref.rel, st, [])  # type: ignore[union-attr]
        if not concurrent:
            for batch in batches:
                subdirs = self._scan(ref, batch, stats)
                if listing is not None:
                    listing.done(subdirs)
            return
        for batch in batches:
            self._push(_EntriesTask(ref.acquire(), batch, True, listing))

    def _scan(self, ref: _DirRef, names: list[str] | None, stats: HealStats,
              descend: bool = True) -> list[str]:
        """Inspect (and heal) ``names`` of ``ref`` (None: all of it) through the C fast path;
        returns the subdirectories found, which are queued as tasks."""
        found: ScanResult = self.h.engine.scan(
            ref.fd, names, self.mount, fix=not self.h.dry_run, tally=not self.h.c_reporting,
            lanes=LANES if self.h.concurrency > 1 else 1)
        stats.scanned += found.scanned
        for name in found.subdirs:
            self._push(_DirTask(ref.acquire(), name, ref.child(name), descend))
        for _node, name, err, _mode, _uid, _gid in found.attention:
            if err == errno.ENOENT:
                stats.skipped["vanished"] += 1
            elif err:
                self._error(stats, ref.child(name), "file", OSError(err, os.strerror(err)))
            else:
                self._inspect(ref, name, stats, descend)
        self.h.count_c(found.fixed, found.skipped, found.tallied,
                      lambda _node, name: ref.child(name), stats)
        return found.subdirs

    def _walk_below(self, ref: _DirRef, stats: HealStats) -> None:
        """Hand the whole subtree below ``ref`` to C; visit what it hands back by its path."""
        found = self.h.engine.walk(ref.fd, self.mount, fix=not self.h.dry_run,
                                   tally=not self.h.c_reporting)
        stats.scanned += found.scanned
        stats.dirs += found.dirs

        rel = NodePaths(found.nodes)

        def path(node: int, name: str) -> str:
            return ref.child(rel(node, name))

        assert self.root_ref is not None
        for node, name, err, mode, _uid, _gid in found.attention:
            if err == errno.ENOENT:
                stats.skipped["vanished"] += 1
            elif err:
                kind = kind_of(mode).value if mode else Kind.FILE.value
                self._error(stats, path(node, name), kind, OSError(err, os.strerror(err)))
            else:  # changed under the walk: revisit it by its path, from the root
                task = self._resolve(self.root_ref, path(node, name), True, stats)
                if task is not None:
                    self._push(task)
        self.h.count_c(found.fixed, found.skipped, found.tallied, path, stats)

    def _inspect(self, parent: _DirRef, name: str, stats: HealStats,
                 descend: bool = True) -> None:
        """The slow path for one entry the fast path handed back (or a directory's name that
        turned out not to be one): opened ``O_PATH|O_NOFOLLOW``, then judged and healed by
        the engine through that fd, or visited when it is a directory now."""
        rel = parent.child(name)
        try:
            fd = os.open(name, PATH_FLAGS, dir_fd=parent.fd)
        except FileNotFoundError:
            stats.skipped["vanished"] += 1
            return
        except OSError as exc:
            self._error(stats, rel, "file", exc)
            return
        try:
            if stat.S_ISDIR(stat_at(fd).st_mode):  # a directory now (listed as something else)
                self._push(_DirTask(parent.acquire(), name, rel, descend))
                return
            stats.scanned += 1
            self._judge_and_fix(fd, rel, stats, False)
        except OSError as exc:
            self._error(stats, rel, "file", exc)
        finally:
            os.close(fd)

    def _judge_and_fix(self, fd: int, rel: str, stats: HealStats, is_root: bool) -> Judged:
        """Judge the inode behind ``fd`` by its own statx and heal it through that fd, in one
        call to the engine (the same ``classify`` as every C walk); account for it here."""
        judged = self.h.engine.judge(fd, self.mount, fix=not self.h.dry_run, is_root=is_root)
        outcome = judged.outcome
        if outcome == "compliant":
            return judged
        verdict = self.h.verdict(judged.mode, judged.gid, is_root)
        kind = verdict.kind.value
        if outcome not in ("fixed", "would-fix"):  # a skip: mount, special, protected, foreign
            owner = outcome in ("protected", "foreign")
            self._skip(stats, rel, kind, outcome,
                       (lambda: verdict.problems(judged.gid, judged.mode)) if owner else None)
            return judged
        stats.violations += 1
        wanted = self.h.reporting if self.h.dry_run else self.h.report_fixes
        problems = tuple(verdict.problems(judged.gid, judged.mode)) if wanted else ()
        if self.h.dry_run:
            self.h.report(Finding(rel, kind, "would-fix", problems))
            return judged
        stats.fixed["group"] += judged.set_gid
        stats.fixed["mode"] += judged.set_mode >= 0
        stats.fixed_kinds[kind] += 1
        if self.h.report_fixes:
            self.h.report(Finding(rel, kind, "fixed", problems))
        return judged

    def _skip(self, stats: HealStats, rel: str, kind: str, reason: str,
              problems: Callable[[], list[str]] | None = None) -> None:
        stats.skipped[reason] += 1
        if self.h.reporting:
            self.h.report(Finding(rel, kind, "skipped", tuple(problems() if problems else ()),
                                  reason))

    def _error(self, stats: HealStats, rel: str, kind: str, exc: OSError) -> None:
        stats.errors += 1
        self.h.report(Finding(rel, kind, "error", (), exc.strerror or str(exc)))

