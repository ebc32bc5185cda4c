"""A coalescing work queue of directory entries, between event readers and heal workers.

What is queued is a place in the watch layer's table, not a path string: an entry ``name`` of a
directory node (:class:`Dir`: a parent link and a name, kept current by the watch through
renames). Its root-relative path is built only when a worker takes the item
(:meth:`WorkQueue.path`), and dropped after the heal. A path string per queued event made the
queue's memory the sum of the path lengths: a member's chain of 6,000 directories with 255-byte
names (built in 0.3 s) held 6 GB in the daemon that way, each of its events carrying a path of
up to 1.5 MB (and its parent's again as a sibling key). Held as places, it is a few hundred
bytes an entry (that chain: +21 MiB of peak RSS).

Why coalesce: a burst (``cp -r``, ``tar x``, conda linking) produces several events per entry,
and our own chgrp/chmod produce more. Each entry is queued at most once until a worker takes it;
an entry queued as ``subtree`` (a new or moved-in directory, or the whole root after an
overflow) absorbs later requests for itself and for anything below it that are still waiting,
because the subtree pass will see them anyway. Readers never block: ``put`` only touches dicts.

Entries are handed out in batches of siblings: taking one entry takes every waiting entry of
the same directory with it, so a worker resolves that directory once for all of them (a burst
writes many files per directory; resolving each path from the root costs ~4x the heal itself).
While a burst goes on, an item is handed out only once it has waited ``SETTLE``, so that a
batch holds what a writer made meanwhile rather than the one or two entries an idle worker would
find; at rest (nothing handed out for ``SETTLE``) an item is ready at once, so a lone change is
healed in a millisecond, not in ``SETTLE``. The reader queues one read batch's names of a
directory at once (``put_names``).

Two lanes: creations and moves (``urgent``) go before attribute changes. Most IN_ATTRIB events
of a burst are the echoes of our own fixes, which find nothing to do; in one lane they would
queue ahead of entries still broken and delay the end of the burst by seconds. A real chmod by
a user waits only until the new entries are done, and an entry waiting in the later lane moves
to the first when an urgent event names it.

Thread-safety of the places: only the watch's reader thread changes them (and calls ``put``
and then ``moved``); a worker reads a place's parent links to build its path. A rename racing
that read gives a path that is only a hint, as every event path is: the healer re-resolves it
from the root fd, and the rename's own events queue the new place. The last path built is kept
for the next item's (a chain built level by level queues each level's child next: extending
it is one string copy, not a walk up thousands of parent links); any rename discards it.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from itertools import repeat
from typing import NamedTuple, Protocol

# Parent links followed to build one path, at most: past it a rename racing the read (see the
# module docstring) made a loop, which no tree deeper than this can be confused with.
MAX_DEPTH = 1 << 22
# How long an item waits before a worker takes it during a burst. A burst names each entry
# several times (its creation, the writer's own chmod or utime, the echo of our fix) and a
# directory's entries one by one: taken at once, a batch held one or two names, and its fixed
# cost (a resolve from the root, a C call, the accounting) was paid per entry. After this wait a
# batch holds what the writer made in that time, and entries below a waiting new directory
# are not queued at all (its subtree pass covers them). Far below what a person notices.
SETTLE = 0.02


class Dir(Protocol):
    """A directory as the watch layer places it now; ``parent`` None: the root."""

    @property
    def parent(self) -> Dir | None: ...

    @property
    def name(self) -> str: ...


class _Root:
    """The root of every tree: what the service queues (a reconcile) without a watch."""

    __slots__ = ()
    parent = None
    name = ""


ROOT: Dir = _Root()
Key = tuple[Dir, str]  # (directory, entry name); name "" only for the root itself


def _key(d: Dir, name: str) -> Key:
    """The one key of a place: every root node is ROOT (a rebuilt watch has a new one)."""
    return (ROOT if d.parent is None else d), name


def path_of(d: Dir, name: str = "") -> str:
    """Root-relative path of entry ``name`` of ``d`` ("" : ``d`` itself), as placed now."""
    parts = [name] if name else []
    up: Dir | None = d
    for _ in range(MAX_DEPTH):
        if up is None or up.parent is None:
            return "/".join(reversed(parts))
        parts.append(up.name)
        up = up.parent
    raise RuntimeError("directory renamed in a loop while its path was read")


class Item(NamedTuple):
    """A subtree to reconcile (``subtree``: entry ``name`` of ``dir``, or the root), or entries
    ``names`` of directory ``dir`` (none: the root directory itself, an event on the root)."""

    dir: Dir
    name: str
    subtree: bool
    names: tuple[str, ...] = ()


class WorkQueue:
    """FIFO of distinct entries; ``subtree`` wins over ``entry`` for the same or a deeper one."""

    def __init__(self) -> None:
        # key -> when it may be handed out (monotonic: ``_ready_at``), in each lane; subtree
        # items are also in _subtrees
        self._items: OrderedDict[Key, float] = OrderedDict()
        self._later: OrderedDict[Key, float] = OrderedDict()  # entries from attribute events
        self._siblings: dict[Dir, set[str]] = {}  # directory -> names waiting as entries
        self._subtrees: set[Key] = set()  # keys waiting as subtree items
        self._cond = threading.Condition()
        self._busy = 0
        self._closed = False
        self._moves = 0  # renames so far: a path built before one may be stale
        self._last: tuple[Dir, str, int] | None = None  # a directory, its path, at _moves
        self._handed = float("-inf")  # when get_many last handed something out

    def put(self, d: Dir, name: str = "", subtree: bool = False, urgent: bool = True) -> bool:
        """Queue entry ``name`` of directory ``d`` (the root: ``ROOT`` and ""); False when it
        was already covered by a waiting item.

        ``urgent`` False (an attribute change) queues an entry in the later lane."""
        key = _key(d, name)
        with self._cond:
            if self._closed:
                return False
            if key in self._later:
                if not (urgent or subtree):
                    return False
                del self._later[key]  # promoted: re-queued below in the first lane
                self._unlink(key)
            if key in self._items:
                if subtree and key not in self._subtrees:
                    self._subtrees.add(key)
                    self._unlink(key)
                    return True
                return False
            if self._covered(key):
                return False
            now = self._ready_at()
            if urgent or subtree or not name:
                self._items[key] = now
                if subtree:
                    self._subtrees.add(key)
            else:
                self._later[key] = now
            if not subtree and name:
                self._siblings.setdefault(key[0], set()).add(name)
            self._cond.notify()
            return True

    def put_names(self, d: Dir, names: set[str], urgent: bool) -> None:
        """:meth:`put` of every entry ``names`` of directory ``d`` (one read batch's events on
        it), the same rules as set operations under one lock, with one wake-up: a burst's
        names cost a C step each here, not a lock, a notify and a dozen lookups each."""
        if not names:
            return
        with self._cond:
            if self._closed:
                return
            d = _key(d, "")[0]
            covered = self._covered((d, ""))  # the same for every entry of ``d``
            now = self._ready_at()
            waiting = self._siblings.get(d)
            if urgent and waiting:
                later = self._later
                for key in [k for k in zip(repeat(d), names & waiting) if k in later]:
                    del later[key]  # promoted: to the end of the first lane, unless covered
                    if covered:
                        self._unlink(key)
                    else:
                        self._items[key] = now
            if covered:
                return
            waiting = self._siblings.get(d)
            fresh = names - waiting if waiting else set(names)
            if self._subtrees:  # a directory of ``d`` waiting as a subtree covers its name
                fresh = {n for n in fresh if (d, n) not in self._subtrees}
            if not fresh:
                return
            (self._items if urgent else self._later).update(dict.fromkeys(zip(repeat(d), fresh),
                                                                          now))
            if waiting is None:
                self._siblings[d] = fresh
            else:
                waiting |= fresh
            self._cond.notify()

    def _ready_at(self) -> float:
        """When an item queued now may be handed out: at once at rest, after ``SETTLE`` while
        a burst goes on (something was handed out less than ``SETTLE`` ago)."""
        now = time.monotonic()
        return now + SETTLE if now - self._handed < SETTLE else now

    def _unlink(self, key: Key) -> None:
        d, name = key
        names = self._siblings.get(d)
        if names is not None:
            names.discard(name)
            if not names:
                del self._siblings[d]

    def _covered(self, key: Key) -> bool:
        """A waiting subtree item on an ancestor (or the root) already includes ``key``.

        Nothing to look up while no subtree waits (a chain built one level at a time queues
        entries only); else the directories above are looked up by their parent links, which
        only the reader thread (the caller) changes."""
        subtrees = self._subtrees
        if not subtrees:
            return False
        if (ROOT, "") in subtrees:
            return True
        up = key[0]
        while up.parent is not None:
            if _key(up.parent, up.name) in subtrees:
                return True
            up = up.parent
        return False

    def get(self, timeout: float) -> Item | None:
        """:meth:`get_many` of one item; None after ``timeout``."""
        items = self.get_many(timeout, 1)
        return items[0] if items else None

    def get_many(self, timeout: float, most: int) -> list[Item]:
        """The oldest waiting item (with its waiting siblings) once it is ready (``_ready_at``)
        (the first lane's first), or [] after ``timeout`` (so workers wake to show liveness).
        When it is a batch of entries, up to ``most`` - 1 more batches of other directories
        that have settled come with it (a burst's directories hold a few entries each: one
        hand-out, and one call of the healer, for many of them). Call :meth:`done` once."""
        with self._cond:
            lane = self._ready(time.monotonic() + timeout)
            if lane is None:
                return []
            self._busy += 1
            self._handed = time.monotonic()
            items = [self._take(lane)]
            while items[0].names and len(items) < most:
                lane = self._ready(0.0)
                if lane is None:
                    break
                d, name = next(iter(lane))
                if not name or (d, name) in self._subtrees:
                    break
                items.append(self._take(lane))
            return items

    def _take(self, lane: OrderedDict[Key, float]) -> Item:
        """The first item of ``lane``, with its waiting siblings (under the lock)."""
        key = lane.popitem(last=False)[0]
        subtree = key in self._subtrees
        if subtree:
            self._subtrees.discard(key)
        d, name = key
        if subtree or not name:
            return Item(d, name, subtree)
        names = self._siblings.pop(d)
        for n in names:  # siblings from both lanes: one resolve serves them all
            self._items.pop((d, n), None)
            self._later.pop((d, n), None)
        return Item(d, "", False, tuple(sorted(names)))

    def _ready(self, end: float) -> OrderedDict[Key, float] | None:
        """The lane whose oldest item has settled (waiting until one has, or until ``end``);
        None at ``end`` with nothing settled. Once closed, nothing waits to settle."""
        while True:
            now = time.monotonic()
            wait = end - now
            for lane in (self._items, self._later):
                if lane:
                    ready = next(iter(lane.values()))
                    if ready <= now or self._closed:
                        return lane
                    wait = min(wait, ready - now)
            if wait <= 0 or (self._closed and not (self._items or self._later)):
                return None
            self._cond.wait(wait)

    def moved(self) -> None:
        """A directory was placed elsewhere (called by the reader once the place is updated):
        the path kept from an earlier item may be stale."""
        self._moves += 1

    def path(self, item: Item) -> str:
        """The root-relative path of ``item``'s subtree, or of its entries' directory, built
        now (from the path kept from the last item when its directory is the same or the
        parent, as along a chain)."""
        moves, last, d = self._moves, self._last, item.dir
        if last is not None and last[2] == moves and last[0] is d:
            rel = last[1]
        elif last is not None and last[2] == moves and d.parent is last[0]:
            rel = f"{last[1]}/{d.name}" if last[1] else d.name
        else:
            rel = path_of(d)
        if self._moves == moves:  # no rename since ``moves`` was read: keep it
            self._last = (d, rel, moves)
        if not item.name:
            return rel
        return f"{rel}/{item.name}" if rel else item.name

    def done(self) -> None:
        """A worker finished the item it got (for :meth:`wait_idle`)."""
        with self._cond:
            self._busy -= 1
            self._cond.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Block until nothing is waiting or being worked on; False on timeout."""
        with self._cond:
            return self._cond.wait_for(
                lambda: not self._items and not self._later and not self._busy, timeout)

    def close(self) -> None:
        """Wake every waiting worker; later ``put`` calls are ignored."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed

    def __len__(self) -> int:
        with self._cond:
            return len(self._items) + len(self._later) + self._busy
