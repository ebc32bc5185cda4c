"""The poller: heals what changed under a root without inotify, at a fraction of a full walk.

Why not watchdog's PollingObserver: it keeps a full stat per entry (~800 B each) and follows
symlinks. Here the state is one small record per *directory* (inode, mtime, ctime, names of its
subdirectories), keyed by the directory's inode number: a key of bounded size whatever the
depth (keyed by path, a chain of d directories would cost d²/2 characters of keys), and one a
directory keeps when it is renamed within the root. Creating, removing or renaming an entry changes
its parent directory's mtime, and a chmod/chgrp of a directory changes its own ctime, so an
incremental pass opens and stats
every directory but lists — and inspects the entries of — only those whose stamp moved; new
subdirectories are walked whole. What it cannot see — a chmod of a *file* by another NFS client,
which touches only that file's ctime — is caught by the full pass (``full=True``, run at start,
after overflows and every ``watch.full_scan_interval``), which lists everything and refreshes
the table.

Records of directories that are gone are dropped after every pass that saw the whole root
through this table (full passes, and every pass of a concurrent walk); the serial pass of a
local disk checks the table in C and leaves them to the next full pass.

Both kinds of pass are the healer's own walk (:class:`envctl_shared.heal.Healer`, with a
:class:`~envctl_shared.heal.walker.DirPlanner` over this table): concurrent on NFS/EFS, where every
call is a round trip, and every safety rule of the healer (no-follow, same mount, protected
owners, zero writes when correct) holds unchanged. The poller heals directly; it queues nothing.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..heal import Healer, HealStats
from ..heal.fsops import Stamp, Stat


@dataclass
class PollStats:
    """One pass: directories visited, directories listed, what the healer did."""

    dirs: int = 0
    listed: int = 0
    heal: HealStats = field(default_factory=HealStats)

    @property
    def duration(self) -> float:
        return self.heal.duration


class _Plan:
    """One pass's DirPlanner over the shared table (``full``: list every directory)."""

    def __init__(self, poller: Poller, full: bool) -> None:
        self.poller = poller
        self.full = full
        self.stats = PollStats()
        self.seen: set[int] = set()  # inode numbers of the directories this pass visited

    def plan(self, rel: str, st: Stat) -> Sequence[str] | None:
        known = self.poller.stamp(st.st_ino)
        with self.poller.lock:
            self.seen.add(st.st_ino)
            self.stats.dirs += 1
            if self.full or known is None or not known.same(st):
                self.stats.listed += 1
                return None
        return known.subdirs

    def listed(self, rel: str, st: Stat, subdirs: list[str]) -> None:
        self.poller.record(Stamp.of(st, tuple(subdirs)))


class Poller:
    """Keeps the directory table of one root and runs passes of its walker over it."""

    def __init__(self, walker: Healer) -> None:
        self.walker = walker
        self.lock = threading.Lock()
        self._stamps: dict[int, Stamp] = {}  # directory inode number -> what was seen

    @property
    def directories(self) -> int:
        return len(self._stamps)

    def run(self, full: bool = False) -> PollStats:
        """One pass; the first is necessarily full (nothing is known yet)."""
        plan = _Plan(self, full)
        if full or not self._stamps or self.walker.concurrency > 1:
            plan.stats.heal = self.walker.run("", recursive=True, planner=plan)
            self._sweep(plan.seen)
            return plan.stats
        return self._run_serial(plan)

    def _run_serial(self, plan: _Plan) -> PollStats:
        """An incremental pass on a local disk: the healer checks every stamp in one C call
        (Python would spend more per directory than the syscalls do), then the walker, with
        this table as its planner, visits only the top-most directories it reports."""
        start = time.monotonic()
        with self.lock:
            visited, stale = self.walker.stale_dirs(self._stamps)
        plan.stats.dirs += visited
        heal = HealStats(scanned=visited, dirs=visited)
        top: set[str] = set()  # a visit covers what lies below: skip stale descendants
        for rel in sorted(stale, key=len):
            parts = rel.split("/")
            if "" not in top and not any("/".join(parts[:i]) in top for i in range(1, len(parts))):
                top.add(rel)
        for rel in sorted(top):
            heal.merge(self.walker.run(rel, recursive=True, planner=plan))
        heal.duration = time.monotonic() - start
        plan.stats.heal = heal
        return plan.stats

    def stamp(self, ino: int) -> Stamp | None:
        with self.lock:
            return self._stamps.get(ino)

    def record(self, stamp: Stamp) -> None:
        """Store a fresh listing of the directory ``stamp.ino``."""
        with self.lock:
            self._stamps[stamp.ino] = stamp

    def _sweep(self, seen: set[int]) -> None:
        """After a pass that visited every directory of the root: forget the others (gone, or
        no longer reachable from the root). A pass that failed part-way raised before this."""
        with self.lock:
            for ino in [ino for ino in self._stamps if ino not in seen]:
                del self._stamps[ino]
